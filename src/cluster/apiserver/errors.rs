//! API errors rendered as `metav1.Status`.

use http::StatusCode;
use serde_json::{Value, json};

use crate::cluster::store::StoreError;

/// A field-level cause for 422 Invalid.
#[derive(Clone, Debug, PartialEq)]
pub struct Cause {
    pub kind: &'static str,
    pub field: String,
    pub message: String,
}

impl Cause {
    pub fn required(field: impl Into<String>, msg: &str) -> Self {
        let field = field.into();
        Cause {
            kind: "FieldValueRequired",
            message: format!("Required value{}", suffix(msg)),
            field,
        }
    }
    pub fn invalid(field: impl Into<String>, value: &str, msg: &str) -> Self {
        let field = field.into();
        Cause {
            kind: "FieldValueInvalid",
            message: format!("Invalid value: {value:?}{}", suffix(msg)),
            field,
        }
    }
    pub fn forbidden(field: impl Into<String>, msg: &str) -> Self {
        let field = field.into();
        Cause {
            kind: "FieldValueForbidden",
            message: format!("Forbidden{}", suffix(msg)),
            field,
        }
    }
    pub fn duplicate(field: impl Into<String>, value: &str) -> Self {
        let field = field.into();
        Cause {
            kind: "FieldValueDuplicate",
            message: format!("Duplicate value: {value:?}"),
            field,
        }
    }
    pub fn unknown(field: impl Into<String>) -> Self {
        let field = field.into();
        Cause {
            kind: "FieldValueInvalid",
            message: format!("unknown field {field:?}"),
            field,
        }
    }
}

fn suffix(msg: &str) -> String {
    if msg.is_empty() {
        String::new()
    } else {
        format!(": {msg}")
    }
}

#[derive(Clone, Debug)]
pub struct ApiError {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", msg)
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
    }
    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", msg)
    }
    pub fn not_found(resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{resource} {name:?} not found"),
        );
        e.details = json!({"name": name, "kind": resource});
        e
    }
    pub fn path_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    }
    pub fn already_exists(resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{resource} {name:?} already exists"),
        );
        e.details = json!({"name": name, "kind": resource});
        e
    }
    pub fn conflict(resource: &str, name: &str) -> Self {
        let msg = format!(
            "Operation cannot be fulfilled on {resource} {name:?}: the object has been modified; please apply your \
             changes to the latest version and try again"
        );
        let mut e = Self::new(StatusCode::CONFLICT, "Conflict", msg);
        e.details = json!({"name": name, "kind": resource});
        e
    }
    pub fn gone(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, "Expired", msg)
    }
    pub fn method_not_allowed(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", msg)
    }
    pub fn unsupported_media(ct: &str) -> Self {
        let msg = format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (ConfigMap, Secret, Namespace, DeleteOptions only); got {ct:?}"
        );
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", msg)
    }
    pub fn not_implemented(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, "NotImplemented", msg)
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", msg)
    }
    /// 422 Invalid: `Kind "name" is invalid: field: message, ...`
    pub fn invalid(kind: &str, group: &str, name: &str, causes: Vec<Cause>) -> Self {
        let list: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        let msg = if list.len() == 1 {
            format!("{kind} {name:?} is invalid: {}", list[0])
        } else {
            format!("{kind} {name:?} is invalid: [{}]", list.join(", "))
        };
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", msg);
        let causes: Vec<Value> = causes
            .iter()
            .map(|c| json!({"reason": c.kind, "message": c.message, "field": c.field}))
            .collect();
        e.details = json!({"name": name, "group": group, "kind": kind, "causes": causes});
        e
    }

    pub fn from_store(e: StoreError, resource: &str, name: &str) -> Self {
        match e {
            StoreError::NotFound => Self::not_found(resource, name),
            StoreError::AlreadyExists => Self::already_exists(resource, name),
            StoreError::Conflict { .. } => Self::conflict(resource, name),
            StoreError::Gone { requested, oldest } => {
                Self::gone(format!("too old resource version: {requested} ({oldest})"))
            }
            StoreError::Backend(m) => Self::internal(m),
        }
    }

    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code.as_u16(),
        });
        if !self.details.is_null() {
            s["details"] = self.details.clone();
        }
        s
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
