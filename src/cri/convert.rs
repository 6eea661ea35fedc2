//! Conversions between CRI messages and podvisor's domain types.

use super::proto::runtime as cri;
use crate::image::{Credentials, ImageRecord, auth::AuthError};

pub fn image_to_cri(record: &ImageRecord) -> cri::Image {
    let (uid, username) = split_user(&record.config.user);
    cri::Image {
        id: record.id.clone(),
        repo_tags: record.repo_tags.clone(),
        repo_digests: record.repo_digests.clone(),
        size: record.size,
        uid: uid.map(|value| cri::Int64Value { value }),
        username,
        spec: Some(cri::ImageSpec {
            image: record.id.clone(),
            ..Default::default()
        }),
        pinned: record.pinned,
    }
}

/// The image's `USER`: a numeric uid goes to `uid`, a name to `username`;
/// the group part is dropped as the CRI has no field for it.
fn split_user(user: &str) -> (Option<i64>, String) {
    let user = user.split(':').next().unwrap_or_default();
    match user.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, user.to_string()),
    }
}

pub fn credentials_from_cri(auth: Option<&cri::AuthConfig>) -> Result<Option<Credentials>, AuthError> {
    let Some(auth) = auth else {
        return Ok(None);
    };
    let creds = Credentials::new(
        &auth.username,
        &auth.password,
        &auth.auth,
        &auth.identity_token,
        &auth.registry_token,
        &auth.server_address,
    )?;
    Ok((!creds.is_empty()).then_some(creds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_users_become_uids() {
        assert_eq!(split_user("1000:1000"), (Some(1000), String::new()));
        assert_eq!(split_user("0"), (Some(0), String::new()));
        assert_eq!(split_user("nobody"), (None, "nobody".to_string()));
        assert_eq!(split_user(""), (None, String::new()));
    }

    #[test]
    fn empty_auth_config_means_anonymous() {
        assert_eq!(credentials_from_cri(Some(&cri::AuthConfig::default())).unwrap(), None);
        let creds = credentials_from_cri(Some(&cri::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        }))
        .unwrap()
        .unwrap();
        assert_eq!(creds.username, "u");
    }
}
