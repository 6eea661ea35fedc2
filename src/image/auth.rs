//! Registry credentials: from the CRI `AuthConfig` of a pull, or from a docker
//! `config.json` style file, and the `WWW-Authenticate` challenge they answer.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

/// One registry login. Secrets never reach `Debug` output or logs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// An OAuth2 refresh token, exchanged at the token endpoint.
    pub identity_token: String,
    /// A bearer token sent to the registry as it is.
    pub registry_token: String,
    /// When set, the credentials apply only to this registry host.
    pub server_address: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("server_address", &self.server_address)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth field is not base64 of user:password")]
    BadAuthField,
    #[error("cannot read credentials file {path}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials file {path} is not valid JSON: {message}")]
    FileFormat { path: String, message: String },
}

impl Credentials {
    /// Builds credentials from the CRI fields; `auth` (base64 `user:password`) fills
    /// in the user and password when they are empty.
    pub fn new(
        username: &str,
        password: &str,
        auth: &str,
        identity_token: &str,
        registry_token: &str,
        server_address: &str,
    ) -> Result<Credentials, AuthError> {
        let mut creds = Credentials {
            username: username.to_string(),
            password: password.to_string(),
            identity_token: identity_token.to_string(),
            registry_token: registry_token.to_string(),
            server_address: normalize_host(server_address),
        };
        if !auth.is_empty() && creds.username.is_empty() {
            let (user, pass) = decode_auth(auth)?;
            creds.username = user;
            creds.password = pass;
        }
        Ok(creds)
    }

    pub fn is_empty(&self) -> bool {
        self.username.is_empty()
            && self.password.is_empty()
            && self.identity_token.is_empty()
            && self.registry_token.is_empty()
    }

    pub fn applies_to(&self, host: &str) -> bool {
        self.server_address.is_empty() || self.server_address == normalize_host(host)
    }

    pub fn basic_header(&self) -> Option<String> {
        (!self.username.is_empty()).then(|| {
            format!(
                "Basic {}",
                BASE64.encode(format!("{}:{}", self.username, self.password))
            )
        })
    }
}

fn decode_auth(auth: &str) -> Result<(String, String), AuthError> {
    let decoded = BASE64.decode(auth.trim()).map_err(|_| AuthError::BadAuthField)?;
    let text = String::from_utf8(decoded).map_err(|_| AuthError::BadAuthField)?;
    let (user, pass) = text.split_once(':').ok_or(AuthError::BadAuthField)?;
    Ok((user.to_string(), pass.to_string()))
}

/// `https://index.docker.io/v1/` -> `docker.io`, `http://host:5000/x` -> `host:5000`.
pub fn normalize_host(address: &str) -> String {
    let without_scheme = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    let host = without_scheme.split('/').next().unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// The credentials a pull may use: those of the request, then the file's.
#[derive(Clone, Debug, Default)]
pub struct Keychain {
    pub request: Option<Credentials>,
    pub file: HashMap<String, Credentials>,
}

impl Keychain {
    /// Credentials for one registry or mirror host, if any.
    pub fn for_host(&self, host: &str) -> Option<&Credentials> {
        self.request
            .as_ref()
            .filter(|c| c.applies_to(host))
            .or_else(|| self.file.get(&normalize_host(host)))
    }
}

impl Credentials {
    /// A short stable tag of the secrets, so cached tokens never cross logins.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        for part in [
            &self.username,
            &self.password,
            &self.identity_token,
            &self.registry_token,
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        hex::encode(&hasher.finalize()[..8])
    }
}

/// Reads the credentials for every registry in a docker `config.json` style file.
/// A missing file holds no credentials.
pub fn load_auth_file(path: &Path) -> Result<HashMap<String, Credentials>, AuthError> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Entry {
        auth: String,
        username: String,
        password: String,
        identitytoken: String,
        registrytoken: String,
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(source) => {
            return Err(AuthError::File {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let file: File = serde_json::from_str(&text).map_err(|err| AuthError::FileFormat {
        path: path.display().to_string(),
        message: err.to_string(),
    })?;
    let mut out = HashMap::new();
    for (address, entry) in file.auths {
        let host = normalize_host(&address);
        let creds = Credentials::new(
            &entry.username,
            &entry.password,
            &entry.auth,
            &entry.identitytoken,
            &entry.registrytoken,
            &host,
        )?;
        out.insert(host, creds);
    }
    Ok(out)
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => Some(Challenge::Basic),
            "bearer" => {
                let params = parse_params(params);
                Some(Challenge::Bearer {
                    realm: params.get("realm")?.clone(),
                    service: params.get("service").cloned(),
                    scope: params.get("scope").cloned(),
                })
            }
            _ => None,
        }
    }
}

/// Parses `key="value", key2=value2` (values may hold commas inside quotes).
fn parse_params(input: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = input.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        out.insert(key, value);
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge_with_commas_in_scope() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(Challenge::parse(r#"Basic realm="x""#), Some(Challenge::Basic));
        assert_eq!(Challenge::parse("Negotiate"), None);
    }

    #[test]
    fn auth_field_fills_user_and_password() {
        let creds = Credentials::new("", "", &BASE64.encode("alice:s3:cret"), "", "", "").unwrap();
        assert_eq!(creds.username, "alice");
        assert_eq!(creds.password, "s3:cret");
        assert!(Credentials::new("", "", "!!!", "", "", "").is_err());
        assert!(!format!("{creds:?}").contains("s3:cret"));
    }

    #[test]
    fn reads_docker_config_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{}"}},
                    "127.0.0.1:5000": {{"identitytoken": "refresh-me"}}}}}}"#,
                BASE64.encode("bob:pw")
            ),
        )
        .unwrap();
        let creds = load_auth_file(&path).unwrap();
        assert_eq!(creds["docker.io"].username, "bob");
        assert_eq!(creds["127.0.0.1:5000"].identity_token, "refresh-me");
        assert!(creds["docker.io"].applies_to("index.docker.io"));
        assert!(load_auth_file(&dir.path().join("none.json")).unwrap().is_empty());
    }
}
