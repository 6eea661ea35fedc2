//! Pushing test images over the OCI distribution API.

use bytes::Bytes;
use reqwest::{Method, StatusCode, Url, header};
use serde_json::json;

use super::oci::{Flavour, TestImage, sha256_digest};

/// A minimal distribution-API client, optionally with basic auth.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: Url,
    auth: Option<(String, String)>,
}

impl RegistryClient {
    /// `base` is e.g. "http://127.0.0.1:PORT".
    pub fn new(base: &str) -> RegistryClient {
        RegistryClient {
            http: reqwest::Client::new(),
            base: Url::parse(base).expect("registry base url"),
            auth: None,
        }
    }

    pub fn with_basic_auth(mut self, user: &str, pass: &str) -> RegistryClient {
        self.auth = Some((user.into(), pass.into()));
        self
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match &self.auth {
            Some((user, pass)) => req.basic_auth(user, Some(pass)),
            None => req,
        }
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("join registry url")
    }

    /// Uploads a blob (POST + PUT ?digest=) unless HEAD finds it already.
    pub async fn push_blob(&self, repo: &str, data: Bytes) -> String {
        let digest = sha256_digest(&data);
        let head = self
            .request(Method::HEAD, self.url(&format!("/v2/{repo}/blobs/{digest}")))
            .send()
            .await
            .expect("HEAD blob");
        if head.status() == StatusCode::OK {
            return digest;
        }
        let start = self
            .request(Method::POST, self.url(&format!("/v2/{repo}/blobs/uploads/")))
            .send()
            .await
            .expect("POST blob upload");
        assert_eq!(start.status(), StatusCode::ACCEPTED, "start upload {digest}");
        let location = start.headers()[header::LOCATION].to_str().expect("Location header");
        // Location may be absolute or relative; keep its `_state` query.
        let mut put_url = self.url(location);
        put_url.query_pairs_mut().append_pair("digest", &digest);
        let put = self
            .request(Method::PUT, put_url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(data)
            .send()
            .await
            .expect("PUT blob");
        assert_eq!(put.status(), StatusCode::CREATED, "finish upload {digest}");
        digest
    }

    /// PUTs a manifest (or index) under `reference`; returns its digest.
    pub async fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: Vec<u8>) -> String {
        let digest = sha256_digest(&body);
        let resp = self
            .request(Method::PUT, self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header(header::CONTENT_TYPE, media_type)
            .body(body)
            .send()
            .await
            .expect("PUT manifest");
        let status = resp.status();
        let returned = resp.headers().get("docker-content-digest").cloned();
        assert_eq!(
            status,
            StatusCode::CREATED,
            "PUT manifest {repo}:{reference}: {}",
            resp.text().await.unwrap_or_default()
        );
        if let Some(returned) = returned {
            assert_eq!(returned.to_str().ok(), Some(digest.as_str()));
        }
        digest
    }

    /// Pushes the config, layers and manifest; returns the manifest digest.
    pub async fn push_image(&self, repo: &str, reference: &str, image: &TestImage, flavour: Flavour) -> String {
        self.push_blob(repo, image.config_json().into()).await;
        for layer in &image.layers {
            self.push_blob(repo, layer.blob.clone()).await;
        }
        self.push_manifest(
            repo,
            reference,
            flavour.manifest_media_type(),
            image.manifest_json(flavour),
        )
        .await
    }

    /// Pushes every image by digest, then an index (OCI) or manifest list
    /// (Docker) tagged `tag` with one platform entry each; returns its digest.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        images: &[(&str, &str, Option<&str>, &TestImage)],
        flavour: Flavour,
    ) -> String {
        let mut manifests = Vec::new();
        for (os, arch, variant, image) in images {
            let manifest = image.manifest_json(flavour);
            let digest = self.push_image(repo, &sha256_digest(&manifest), image, flavour).await;
            let mut platform = json!({"architecture": arch, "os": os});
            if let Some(variant) = variant {
                platform["variant"] = json!(variant);
            }
            manifests.push(json!({
                "mediaType": flavour.manifest_media_type(),
                "digest": digest,
                "size": manifest.len(),
                "platform": platform,
            }));
        }
        let index = json!({
            "schemaVersion": 2,
            "mediaType": flavour.index_media_type(),
            "manifests": manifests,
        });
        let body = serde_json::to_vec(&index).expect("serialize index");
        self.push_manifest(repo, tag, flavour.index_media_type(), body).await
    }

    /// GETs a manifest accepting every manifest/index type; returns
    /// (Content-Type, Docker-Content-Digest, body).
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> (String, String, Bytes) {
        let accept = [Flavour::Oci, Flavour::Docker]
            .iter()
            .flat_map(|f| [f.manifest_media_type(), f.index_media_type()])
            .collect::<Vec<_>>()
            .join(", ");
        let resp = self
            .request(Method::GET, self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header(header::ACCEPT, accept)
            .send()
            .await
            .expect("GET manifest");
        assert_eq!(resp.status(), StatusCode::OK, "GET manifest {repo}:{reference}");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (media_type, digest) = (header("content-type"), header("docker-content-digest"));
        (media_type, digest, resp.bytes().await.expect("manifest body"))
    }

    /// GETs a blob's bytes.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> Bytes {
        let resp = self
            .request(Method::GET, self.url(&format!("/v2/{repo}/blobs/{digest}")))
            .send()
            .await
            .expect("GET blob");
        assert_eq!(resp.status(), StatusCode::OK, "GET blob {repo}@{digest}");
        resp.bytes().await.expect("blob body")
    }
}

/// [`RegistryClient::push_image`] without credentials.
pub async fn push_image(base: &str, repo: &str, reference: &str, image: &TestImage, flavour: Flavour) -> String {
    RegistryClient::new(base)
        .push_image(repo, reference, image, flavour)
        .await
}

/// [`RegistryClient::push_index`] without credentials.
pub async fn push_index(
    base: &str,
    repo: &str,
    tag: &str,
    images: &[(&str, &str, Option<&str>, &TestImage)],
    flavour: Flavour,
) -> String {
    RegistryClient::new(base).push_index(repo, tag, images, flavour).await
}
