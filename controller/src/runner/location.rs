//! Where dumps go and come from: `file:///dir` (a mounted volume) or `s3://bucket/prefix` (any
//! S3-compatible store, configured by the `AWS_*` environment), opened as an `object_store`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use url::Url;

use super::redact::redact_urls;

#[derive(thiserror::Error, Debug)]
pub enum LocationError {
    #[error("invalid URL {url}: {source}")]
    Invalid {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("unsupported scheme {scheme:?} in {url} (expected file:///path or s3://bucket/prefix)")]
    UnsupportedScheme { scheme: String, url: String },
    #[error("{url}: {why}")]
    Malformed { url: String, why: &'static str },
    #[error("object name {0:?} must be letters, digits, '.', '_' or '-', not starting with '.'")]
    InvalidName(String),
    #[error("creating the folder {dir}: {source}")]
    CreateDir {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening {url}: {source}")]
    Open {
        url: String,
        #[source]
        source: object_store::Error,
    },
}

/// A folder of objects: a local directory, or a bucket and key prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    File { dir: PathBuf },
    S3 { bucket: String, prefix: String },
}

/// One object in an opened store.
pub struct Object {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    /// The object's URL, as reports show it.
    pub uri: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File { dir } => write!(f, "file://{}", dir.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl Location {
    /// Parses a destination URL: `file:///absolute/dir` or `s3://bucket[/prefix]`.
    pub fn parse(url: &str) -> Result<Location, LocationError> {
        let shown = redact_urls(url);
        let parsed = Url::parse(url).map_err(|source| LocationError::Invalid {
            url: shown.clone(),
            source,
        })?;
        let malformed = |why| LocationError::Malformed {
            url: shown.clone(),
            why,
        };
        if !matches!(parsed.scheme(), "file" | "s3") {
            return Err(LocationError::UnsupportedScheme {
                scheme: parsed.scheme().to_string(),
                url: shown,
            });
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(malformed("no query or fragment allowed"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(malformed(
                "credentials do not belong in the URL (S3 reads them from AWS_* variables)",
            ));
        }
        match parsed.scheme() {
            "file" => {
                if !matches!(parsed.host_str(), None | Some("") | Some("localhost")) {
                    return Err(malformed(
                        "a file URL needs an absolute path: file:///dir (three slashes)",
                    ));
                }
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| malformed("not a local path"))?;
                if dir
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
                {
                    return Err(malformed("'..' is not allowed in the path"));
                }
                Ok(Location::File { dir })
            }
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| malformed("no bucket: s3://bucket/prefix"))?
                    .to_string();
                let prefix = parsed.path().trim_matches('/').to_string();
                if !prefix.is_empty() && Path::parse(&prefix).is_err() {
                    return Err(malformed(
                        "the key prefix has an empty, '.' or '..' segment",
                    ));
                }
                Ok(Location::S3 { bucket, prefix })
            }
            other => Err(LocationError::UnsupportedScheme {
                scheme: other.to_string(),
                url: shown.clone(),
            }),
        }
    }

    /// Parses an object URL into the folder that holds it and its name.
    pub fn parse_object(url: &str) -> Result<(Location, String), LocationError> {
        let shown = redact_urls(url);
        let trimmed = url.trim_end_matches('/');
        let (folder, name) = match trimmed.rsplit_once('/') {
            Some((folder, name)) if !name.is_empty() => (folder, name),
            _ => {
                return Err(LocationError::Malformed {
                    url: shown,
                    why: "no object name at the end of the URL",
                });
            }
        };
        let location = Location::parse(folder)?;
        let name = percent_decode(name);
        check_name(&name)?;
        Ok((location, name))
    }

    /// The URL of object `name` in this folder.
    pub fn object_uri(&self, name: &str) -> String {
        match self {
            Location::File { dir } => format!("file://{}", dir.join(name).display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => format!("s3://{bucket}/{name}"),
            Location::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}/{name}"),
        }
    }

    /// Opens object `name` in this folder; for a directory, creates it first when `create`.
    pub fn open(&self, name: &str, create: bool) -> Result<Object, LocationError> {
        check_name(name)?;
        let uri = self.object_uri(name);
        let open_error = |source| LocationError::Open {
            url: self.to_string(),
            source,
        };
        match self {
            Location::File { dir } => {
                if create {
                    std::fs::create_dir_all(dir).map_err(|source| LocationError::CreateDir {
                        dir: dir.display().to_string(),
                        source,
                    })?;
                }
                let store = LocalFileSystem::new_with_prefix(dir).map_err(open_error)?;
                Ok(Object {
                    store: Arc::new(store),
                    path: Path::from(name),
                    uri,
                })
            }
            Location::S3 { bucket, prefix } => {
                // Endpoint, region, credentials, path or virtual-hosted style: from AWS_* variables.
                let store = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(object_store::RetryConfig {
                        max_retries: 4,
                        retry_timeout: Duration::from_secs(60),
                        ..Default::default()
                    })
                    .build()
                    .map_err(open_error)?;
                let key = if prefix.is_empty() {
                    name.to_string()
                } else {
                    format!("{prefix}/{name}")
                };
                let path = Path::parse(&key)
                    .map_err(|source| open_error(object_store::Error::InvalidPath { source }))?;
                Ok(Object {
                    store: Arc::new(store),
                    path,
                    uri,
                })
            }
        }
    }
}

/// Object names are file names that need no quoting anywhere.
pub fn check_name(name: &str) -> Result<(), LocationError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LocationError::InvalidName(name.to_string()))
    }
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_into_folders() {
        let cases = [
            (
                "file:///var/backups/acme",
                Location::File {
                    dir: "/var/backups/acme".into(),
                },
            ),
            (
                "file:///var/backups/acme/",
                Location::File {
                    dir: "/var/backups/acme/".into(),
                },
            ),
            (
                "s3://bucket",
                Location::S3 {
                    bucket: "bucket".into(),
                    prefix: String::new(),
                },
            ),
            (
                "s3://bucket/a/b/",
                Location::S3 {
                    bucket: "bucket".into(),
                    prefix: "a/b".into(),
                },
            ),
        ];
        for (url, want) in cases {
            assert_eq!(Location::parse(url).expect(url), want, "{url}");
        }
        assert_eq!(
            Location::parse("s3://bucket/a/b")
                .expect("parses")
                .object_uri("x.dump"),
            "s3://bucket/a/b/x.dump"
        );
        assert_eq!(
            Location::parse("file:///d")
                .expect("parses")
                .object_uri("x.dump"),
            "file:///d/x.dump"
        );
    }

    #[test]
    fn bad_destinations_fail_with_a_clear_error_and_no_password() {
        let unknown = Location::parse("gs://bucket/x").expect_err("unknown scheme");
        assert!(matches!(unknown, LocationError::UnsupportedScheme { .. }));
        assert!(unknown.to_string().contains("\"gs\""), "{unknown}");
        for url in [
            "file://relative/dir",
            "s3:///no-bucket",
            "s3://bucket/x?versionId=1",
            "not a url",
        ] {
            assert!(Location::parse(url).is_err(), "{url}");
        }
        let with_password = Location::parse("s3://user:hunter2@bucket/x").expect_err("userinfo");
        assert!(
            !with_password.to_string().contains("hunter2"),
            "{with_password}"
        );
        let unknown = Location::parse("ftp://user:hunter2@host/x").expect_err("unknown scheme");
        assert!(!unknown.to_string().contains("hunter2"), "{unknown}");
    }

    #[test]
    fn object_urls_split_into_folder_and_name() {
        let (location, name) = Location::parse_object("s3://b/p/q/n-1.dump").expect("parses");
        assert_eq!(
            location,
            Location::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert_eq!(name, "n-1.dump");
        let (location, name) = Location::parse_object("s3://b/n.dump").expect("parses");
        assert_eq!(
            location,
            Location::S3 {
                bucket: "b".into(),
                prefix: String::new()
            }
        );
        assert_eq!(name, "n.dump");
        let (location, name) = Location::parse_object("file:///d/e/n.dump").expect("parses");
        assert_eq!(location, Location::File { dir: "/d/e".into() });
        assert_eq!(name, "n.dump");
        assert!(Location::parse_object("s3://b").is_err());
        assert!(Location::parse_object("s3://b/..").is_err());
    }

    #[test]
    fn names_are_plain_file_names() {
        for ok in ["a", "acme-2026-12-01T03.00.dump", "x_y.json"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "ä", &"x".repeat(201)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
