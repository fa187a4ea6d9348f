//! The gRPC adapters over the switching core: [`admin::AdminService`] (`SwitcherAdmin`) and
//! [`proxy_control::ProxyControlService`] (`ProxyControl`), the bearer-token check in front of
//! them, and the mapping of core errors to gRPC status codes. They translate and nothing more.

pub mod admin;
pub mod proxy_control;

use std::sync::Arc;

use switchyard_cli::{Secret, secret::constant_time_eq};
use tonic::{Request, Status, service::Interceptor};

use crate::{
    core::{BatchError, SwitchError},
    leases::LeaseError,
    store::StoreError,
    validate::InvalidInput,
};

impl From<InvalidInput> for Status {
    fn from(e: InvalidInput) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Status::unavailable(e.to_string()),
            StoreError::Corrupt(_) => Status::internal(e.to_string()),
        }
    }
}

impl From<SwitchError> for Status {
    fn from(e: SwitchError) -> Self {
        match e {
            SwitchError::Invalid(e) => e.into(),
            SwitchError::Store(e) => e.into(),
        }
    }
}

impl From<BatchError> for Status {
    fn from(e: BatchError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<LeaseError> for Status {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Invalid(_) => Status::invalid_argument(e.to_string()),
            LeaseError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
            LeaseError::NotFound { .. } => Status::not_found(e.to_string()),
            LeaseError::Unavailable(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// Checks `authorization: Bearer <token>` on every call when a token is configured.
#[derive(Debug, Clone)]
pub struct BearerAuth {
    /// `Bearer <token>`.
    expected: Option<Arc<Secret>>,
}

impl BearerAuth {
    /// Requires `token` when `Some`, lets every call through when `None`.
    pub fn new(token: Option<Secret>) -> Self {
        Self {
            expected: token.map(|t| Arc::new(Secret::new(format!("Bearer {}", t.expose())))),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        match request.metadata().get("authorization") {
            Some(given) if constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) => {
                Ok(request)
            }
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing \"authorization: Bearer <token>\" metadata",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_auth_checks_the_token_only_when_configured() {
        let mut open = BearerAuth::new(None);
        assert!(open.call(Request::new(())).is_ok());

        let mut auth = BearerAuth::new(Some("s3cret".into()));
        let err = auth.call(Request::new(())).expect_err("no token");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert("authorization", "Bearer s3creT".parse().expect("ascii"));
        assert_eq!(
            auth.call(wrong).expect_err("wrong").code(),
            tonic::Code::Unauthenticated
        );

        let mut right = Request::new(());
        right
            .metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().expect("ascii"));
        assert!(auth.call(right).is_ok());
    }
}
