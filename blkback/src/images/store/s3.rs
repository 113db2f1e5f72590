//! The S3 adapter: a [`Backend`] over an S3-compatible object store (`object_store`'s
//! `AmazonS3`, HTTPS through rustls).
//!
//! `s3://BUCKET/PREFIX`: objects are `PREFIX/arenas/...`, `PREFIX/images/...`,
//! `PREFIX/index`. Endpoint, region and credentials come from the environment:
//! `AWS_ENDPOINT_URL` (any S3-compatible server; plain `http://` is allowed for it),
//! `AWS_REGION` (default `us-east-1`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`
//! (and `AWS_SESSION_TOKEN`). Requests use path-style URLs unless
//! `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`.
//!
//! `object_store` is async; the store is not. Each call runs on a small runtime the
//! backend owns and the calling thread waits for the result on a channel, so a call made
//! from inside another tokio runtime (the image node's origin) blocks that thread instead
//! of panicking.

use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::backend::{check_key, Backend};
use super::StoreError;

/// A store location given as `s3://BUCKET[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl S3Url {
    /// `None` if `s` does not start with `s3://`; an error if it does but is malformed.
    pub fn parse(s: &str) -> Option<Result<S3Url, StoreError>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if !bucket_ok || (!prefix.is_empty() && check_key(prefix).is_err()) {
            return Some(Err(StoreError::Invalid(format!(
                "{s:?}: expected s3://BUCKET/PREFIX (bucket: 3-63 of a-z 0-9 . -)"
            ))));
        }
        Some(Ok(S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        }))
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// The S3 backend. See the module docs.
#[derive(Debug)]
pub struct S3Backend {
    url: S3Url,
    s3: Arc<AmazonS3>,
    /// Always `Some` until dropped (taken in `Drop` to shut down without blocking).
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for S3Backend {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime's thread.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn s3_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        path: what.into(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl S3Backend {
    /// Connect to `url` with endpoint, region and credentials from the environment.
    ///
    /// # Errors
    /// A configuration `object_store` refuses (no credentials are checked until the first
    /// request).
    pub fn from_env(url: S3Url) -> Result<S3Backend, StoreError> {
        let mut b = AmazonS3Builder::from_env();
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        }
        if std::env::var("AWS_ENDPOINT_URL").is_ok_and(|e| e.starts_with("http://")) {
            b = b.with_allow_http(true);
        }
        S3Backend::build(url, b)
    }

    /// Connect to `url` at `endpoint` (region `us-east-1`) with these credentials, ignoring
    /// the environment (tests and tools that talk to a known server).
    ///
    /// # Errors
    /// As [`S3Backend::from_env`].
    pub fn with_endpoint(
        url: S3Url,
        endpoint: &str,
        access_key: &str,
        secret_key: &str,
    ) -> Result<S3Backend, StoreError> {
        let b = AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"))
            .with_region("us-east-1")
            .with_access_key_id(access_key)
            .with_secret_access_key(secret_key);
        S3Backend::build(url, b)
    }

    fn build(url: S3Url, b: AmazonS3Builder) -> Result<S3Backend, StoreError> {
        let b = b.with_bucket_name(&url.bucket);
        let s3 = b.build().map_err(|e| s3_err(&url.to_string(), e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("remoca-s3")
            .enable_all()
            .build()
            .map_err(|e| s3_err("tokio runtime", e))?;
        Ok(S3Backend {
            url,
            s3: Arc::new(s3),
            rt: Some(rt),
        })
    }

    fn path(&self, key: &str) -> Result<ObjPath, StoreError> {
        check_key(key)?;
        let full = if self.url.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.url.prefix)
        };
        ObjPath::parse(&full).map_err(|e| StoreError::Invalid(format!("{key}: {e}")))
    }

    /// Run `f` on the backend's runtime and wait for it on this thread.
    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv()
            .map_err(|_| s3_err(&self.url.to_string(), "request task ended"))
    }
}

impl Backend for S3Backend {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        let r = self.run(async move {
            match s3.get(&p).await {
                Ok(g) => g.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        r.map(|b| b.map(|b| b.to_vec()))
            .map_err(|e| s3_err(&format!("{}/{key}", self.url), e))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        let end = offset
            .checked_add(len)
            .ok_or_else(|| StoreError::Invalid("range past 2^64".into()))?;
        let r = self.run(async move { s3.get_range(&p, offset..end).await })?;
        let b = r.map_err(|e| s3_err(&format!("{}/{key}", self.url), e))?;
        Ok(b.to_vec())
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        let payload = PutPayload::from(bytes.to_vec());
        let r = self.run(async move { s3.put(&p, payload).await })?;
        r.map(|_| ())
            .map_err(|e| s3_err(&format!("{}/{key}", self.url), e))
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        let payload = PutPayload::from(bytes.to_vec());
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let r = self.run(async move { s3.put_opts(&p, payload, opts).await })?;
        match r {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(s3_err(&format!("{}/{key}", self.url), e)),
        }
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        let r = self.run(async move {
            match s3.delete(&p).await {
                Err(object_store::Error::NotFound { .. }) => Ok(()),
                other => other,
            }
        })?;
        r.map_err(|e| s3_err(&format!("{}/{key}", self.url), e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        // A recursive listing, one delimited level at a time (no stream handling needed).
        let mut out = Vec::new();
        let rel = prefix.trim_end_matches('/');
        if !rel.is_empty() {
            check_key(rel)?;
        }
        let full: Vec<&str> = [self.url.prefix.as_str(), rel]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        let base = if full.is_empty() {
            None
        } else {
            Some(
                ObjPath::parse(full.join("/"))
                    .map_err(|e| StoreError::Invalid(format!("{prefix}: {e}")))?,
            )
        };
        let strip = if self.url.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.url.prefix)
        };
        let mut todo = vec![base];
        while let Some(dir) = todo.pop() {
            let s3 = self.s3.clone();
            let r = self.run(async move { s3.list_with_delimiter(dir.as_ref()).await })?;
            let r = r.map_err(|e| s3_err(&format!("{}/{prefix}", self.url), e))?;
            todo.extend(r.common_prefixes.into_iter().map(Some));
            for o in r.objects {
                let full = o.location.to_string();
                if let Some(k) = full.strip_prefix(&strip) {
                    out.push((k.to_string(), o.size));
                }
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        self.url.to_string()
    }
}
