use clap::Parser;
use novacron::cli::output::{exit_code, stderr, stdout};
use novacron::cli::{Cli, Cmd, ConfigCmd};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::Config(ConfigCmd::Default) => {
            stdout(format_args!("{}", novacron::config::EMBEDDED_DEFAULT));
            0
        }
        Cmd::Config(ConfigCmd::Check { ref path }) => match novacron::config::Config::load(path, true) {
            Ok(_) => {
                stdout(format_args!("{}: ok\n", path.display()));
                0
            }
            Err(e) => {
                stderr(format_args!("novacron: {e}\n"));
                1
            }
        },
        Cmd::Preflight(ref args) => novacron::cli::preflight::run_preflight(args, cli.json),
        Cmd::Firmware(ref cmd) => novacron::cli::preflight::run_firmware(cmd, cli.json),
        Cmd::Dataplane(ref args) => match novacron::dataplane::run(&args.config) {
            Ok(()) => 0,
            Err(e) => {
                stderr(format_args!("novacron dataplane: {e}\n"));
                1
            }
        },
        Cmd::Serve(ref args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match rt.block_on(novacron::daemon::serve(args.clone())) {
                Ok(()) => 0,
                Err(e) => {
                    stderr(format_args!("novacron: {e}\n"));
                    1
                }
            }
        }
        _ => {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(novacron::cli::run_client(cli))
        }
    };
    std::process::exit(exit_code(code));
}
