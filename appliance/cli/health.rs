//! `novacron health`: the daemon's health report as a table (or JSON), with
//! a Nagios-style exit code: 0 ok, 1 warning, 2 critical. A daemon that
//! cannot be asked is critical.

use super::client::Client;
use crate::core::Action;
use crate::types::{CheckStatus, ErrorBody, HealthCheck, HealthReport};
use hyper::StatusCode;

fn unreachable_report(message: String) -> HealthReport {
    HealthReport {
        status: CheckStatus::Critical,
        node: uuid::Uuid::nil(),
        version: String::new(),
        checks: vec![HealthCheck { name: "daemon".into(), status: CheckStatus::Critical, message }],
    }
}

pub async fn run(c: &Client, json: bool) -> i32 {
    let report = match c.call(Action::HealthDetails, &[], "", None).await {
        Ok((StatusCode::OK, body)) => match serde_json::from_slice::<HealthReport>(&body) {
            Ok(r) => r,
            Err(e) => unreachable_report(format!("unreadable answer from {}: {e}", c.describe())),
        },
        Ok((status, body)) => {
            let why = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| format!("{} ({})", e.error.message, e.error.code))
                .unwrap_or_else(|_| format!("HTTP {status}"));
            unreachable_report(format!("{} answered: {why}", c.describe()))
        }
        Err(e) => unreachable_report(e.to_string()),
    };
    print(&report, json);
    report.status.exit_code()
}

fn print(r: &HealthReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    let width = r.checks.iter().map(|c| c.name.len()).max().unwrap_or(5).max(5);
    println!("{:<width$}  {:<8}  DETAIL", "CHECK", "STATUS");
    for c in &r.checks {
        println!("{:<width$}  {:<8}  {}", c.name, c.status.as_str(), c.message);
    }
    println!("health: {}", r.status.as_str().to_uppercase());
}
