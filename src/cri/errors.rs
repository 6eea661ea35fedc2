//! The one place where podvisor errors become gRPC statuses. Each error is
//! logged here, once.

use tonic::{Code, Status};

use crate::image::ImageError;
use crate::image::registry::RegistryError;
use crate::image::unpack::UnpackError;

pub fn image_status(err: ImageError) -> Status {
    let code = match &err {
        ImageError::Reference(_) | ImageError::Auth(_) | ImageError::Ambiguous(_) => Code::InvalidArgument,
        ImageError::NotFound(_) | ImageError::NoPlatform { .. } => Code::NotFound,
        ImageError::Registry { source, .. } => match source {
            RegistryError::NotFound { .. } => Code::NotFound,
            RegistryError::Unauthorized { .. } => Code::PermissionDenied,
            RegistryError::Unreachable { .. } => Code::Unavailable,
            RegistryError::Status { status, .. } if *status == 429 || *status >= 500 => Code::Unavailable,
            RegistryError::Status { .. } | RegistryError::Invalid { .. } => Code::FailedPrecondition,
            RegistryError::Mismatch { .. } => Code::DataLoss,
        },
        ImageError::Manifest { .. } => Code::FailedPrecondition,
        ImageError::Unpack { source, .. } => match source {
            UnpackError::Unsafe { .. } => Code::InvalidArgument,
            UnpackError::Corrupt { .. } => Code::DataLoss,
            _ => Code::Internal,
        },
        ImageError::DiffIdMismatch { .. } => Code::DataLoss,
        ImageError::Io { .. } | ImageError::Client(_) => Code::Internal,
    };
    status(code, &err)
}

/// Logs the error with its whole chain and turns it into a status carrying that chain.
pub fn status(code: Code, err: &(dyn std::error::Error + 'static)) -> Status {
    let message = crate::error_chain(err);
    if matches!(code, Code::Internal | Code::Unknown | Code::DataLoss) {
        tracing::error!(?code, error = %message, "request failed");
    } else {
        tracing::warn!(?code, error = %message, "request failed");
    }
    Status::new(code, message)
}

pub fn manager_status(err: crate::manager::ManagerError) -> Status {
    use crate::backend::linux::LinuxError;
    use crate::manager::ManagerError;
    use crate::network::NetworkError;
    let code = match &err {
        ManagerError::InvalidArgument(_) => Code::InvalidArgument,
        ManagerError::NotFound { .. } => Code::NotFound,
        ManagerError::AlreadyExists(_) => Code::AlreadyExists,
        ManagerError::FailedPrecondition(_) => Code::FailedPrecondition,
        ManagerError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        ManagerError::Backend(LinuxError::Invalid(_) | LinuxError::Seccomp(_)) => Code::InvalidArgument,
        ManagerError::Backend(LinuxError::Timeout(_)) => Code::DeadlineExceeded,
        ManagerError::Backend(LinuxError::StartFailed(_)) => Code::FailedPrecondition,
        ManagerError::Backend(_) | ManagerError::Store { .. } => Code::Internal,
        ManagerError::Image(_) => Code::Internal,
        ManagerError::Vm(vm) => {
            use crate::backend::vm::VmError;
            match vm {
                VmError::Invalid(_) => Code::InvalidArgument,
                VmError::NoAgent(_) => Code::FailedPrecondition,
                VmError::Timeout(_) => Code::DeadlineExceeded,
                VmError::NotFound(_) => Code::NotFound,
                _ => Code::Internal,
            }
        }
        ManagerError::Network(NetworkError::Invalid(_)) => Code::InvalidArgument,
        ManagerError::Network(NetworkError::Builtin(
            crate::network::builtin::NetError::Conflict(_) | crate::network::builtin::NetError::Invalid(_),
        )) => Code::InvalidArgument,
        ManagerError::Network(NetworkError::Builtin(crate::network::builtin::NetError::Exhausted(_))) => {
            Code::ResourceExhausted
        }
        ManagerError::Network(NetworkError::NotReady(_)) => Code::FailedPrecondition,
        ManagerError::Network(NetworkError::Cni(
            crate::network::cni::CniError::InvalidConfig { .. } | crate::network::cni::CniError::PluginNotFound { .. },
        )) => Code::FailedPrecondition,
        ManagerError::Network(_) => Code::Internal,
    };
    if let ManagerError::Image(inner) = err {
        return image_status(inner);
    }
    status(code, &err)
}
