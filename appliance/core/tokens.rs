//! API tokens: `nct_<id>_<secret>`. The id finds the record; the secret (256
//! bits) is only ever stored as its SHA-256 and compared in constant time.

use super::{Caller, Core, CoreError, Result};
use crate::store::{now_ms, Change, TokenRecord};
use crate::types::{valid_name, Role, Token, TokenCreate, TokenCreated, TokenList};
use crate::util::{random_bytes, rfc3339};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "nct_";

/// The end of a stream opened with a token: see [`Core::until_revoked`].
#[derive(Default)]
pub struct Revoked(Option<(String, tokio::sync::watch::Receiver<std::collections::HashSet<String>>)>);

impl Revoked {
    pub async fn wait(self) {
        if let Some((id, mut rx)) = self.0 {
            // The set only grows, so checking the current value first
            // cannot miss a revocation that happened before the wait.
            if rx.wait_for(|ids| ids.contains(&id)).await.is_ok() {
                return;
            }
        }
        std::future::pending().await
    }
}

fn view(t: &TokenRecord) -> Token {
    Token { id: t.id.clone(), name: t.name.clone(), role: t.role, created_at: rfc3339(t.created_at) }
}

impl Core {
    /// Resolves a bearer token to a caller; `None` for unknown, malformed or
    /// revoked tokens (the caller cannot tell which).
    pub fn authenticate(&self, bearer: &str) -> Option<Caller> {
        let rest = bearer.strip_prefix(PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let tokens = self.tokens.read().unwrap();
        let t = tokens.get(id)?;
        if bool::from(t.hash.ct_eq(&digest)) {
            Some(Caller { name: t.name.clone(), token_id: Some(t.id.clone()), role: t.role })
        } else {
            None
        }
    }

    pub(super) fn list_tokens(&self) -> TokenList {
        let mut tokens: Vec<Token> = self.tokens.read().unwrap().values().map(view).collect();
        tokens.sort_by(|a, b| a.name.cmp(&b.name));
        TokenList { tokens }
    }

    pub fn has_tokens(&self) -> bool {
        !self.tokens.read().unwrap().is_empty()
    }

    pub(super) async fn create_token(&self, req: TokenCreate) -> Result<TokenCreated> {
        valid_name(&req.name).map_err(|m| CoreError::invalid("name", m))?;
        if self.tokens.read().unwrap().values().any(|t| t.name == req.name) {
            return Err(CoreError::NameTaken(req.name));
        }
        let id = hex::encode(random_bytes::<8>());
        let secret = hex::encode(random_bytes::<32>());
        let record = TokenRecord {
            id: id.clone(),
            name: req.name,
            role: req.role,
            hash: Sha256::digest(secret.as_bytes()).into(),
            created_at: now_ms(),
        };
        self.commit(Change::TokenPut(record.clone())).await.map_err(|e| match e {
            CoreError::Store(crate::store::StoreError::Conflict(_)) => {
                CoreError::NameTaken(record.name.clone())
            }
            e => e,
        })?;
        Ok(TokenCreated { token: view(&record), secret: format!("{PREFIX}{id}_{secret}") })
    }

    /// Revokes by id or name. Takes effect on the next request: the cache
    /// is updated in the same step as the store. The last admin token goes
    /// only with `force`.
    pub(super) async fn revoke_token(&self, _caller: &Caller, r: &str, force: bool) -> Result<()> {
        // Two revocations at once must not both see another admin left.
        let _serial = self.create_lock.lock().await;
        let id = {
            let tokens = self.tokens.read().unwrap();
            let t = tokens
                .values()
                .find(|t| t.id == r || t.name == r)
                .ok_or_else(|| CoreError::NotFound(format!("token {r:?}")))?;
            let admins = tokens.values().filter(|t| t.role == Role::Admin).count();
            if t.role == Role::Admin && admins == 1 && !force {
                return Err(CoreError::LastAdmin(t.name.clone()));
            }
            t.id.clone()
        };
        // The commit also ends the token's open streams (apply_to_cache).
        self.commit(Change::TokenDelete { id }).await?;
        Ok(())
    }

    /// Resolves once `caller`'s token is revoked (at once if it already
    /// is); never for callers without a token (the local socket's root).
    pub fn until_revoked(&self, caller: &Caller) -> Revoked {
        Revoked(caller.token_id.clone().map(|id| (id, self.revoked.subscribe())))
    }

    /// Creates the first admin token when there is none, returning its
    /// secret. Used once, on first start.
    pub async fn bootstrap_admin_token(&self) -> Result<Option<TokenCreated>> {
        if self.has_tokens() {
            return Ok(None);
        }
        self.create_token(TokenCreate { name: "admin".into(), role: Role::Admin }).await.map(Some)
    }
}
