//! Keeping passwords out of logs, reports and errors: every text the runner shows passes through a
//! [`Redactor`], which masks the password part of URLs, `password=` settings and every secret it
//! was given.

const MASK: &str = "***";

/// Masks known secrets and anything that looks like a password in text.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    /// Longest first, so that a secret containing another is masked whole.
    secrets: Vec<String>,
}

impl Redactor {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Redactor {
        let mut redactor = Redactor::default();
        redactor.add(secrets);
        redactor
    }

    pub fn add(&mut self, secrets: impl IntoIterator<Item = String>) {
        self.secrets
            .extend(secrets.into_iter().filter(|s| !s.is_empty()));
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        self.secrets.dedup();
    }

    pub fn redact(&self, text: &str) -> String {
        let mut text = redact_urls(text);
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), MASK);
            }
        }
        text
    }
}

/// Masks `user:PASSWORD@` in every `scheme://` URL and the value of every `password=` setting.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let authority_start = at + 3;
        out.push_str(&rest[..authority_start]);
        rest = &rest[authority_start..];
        // The authority ends at the first '/', '?', '#', whitespace or quote; the password
        // is between the first ':' and the last '@' in it.
        let end = rest
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(rest.len());
        let authority = &rest[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..=colon]);
                out.push_str(MASK);
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    redact_password_settings(&out)
}

/// `password=secret` (conninfo strings, URL query parameters) -> `password=***`.
fn redact_password_settings(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find("password=") {
        let value_start = search + found + "password=".len();
        let value_end = text[value_start..]
            .find(|c: char| matches!(c, '&' | '"' | '\'' | ')' | ',' | ';') || c.is_whitespace())
            .map_or(text.len(), |i| value_start + i);
        out.push_str(&text[copied..value_start]);
        if value_end > value_start {
            out.push_str(MASK);
        }
        copied = value_end;
        search = value_end.max(value_start);
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_masked() {
        let cases = [
            (
                "connecting to postgres://alice:s3cr%40t@db:5432/x failed",
                "connecting to postgres://alice:***@db:5432/x failed",
            ),
            ("postgresql://bob:p@ss@db/x", "postgresql://bob:***@db/x"),
            ("postgres://alice@db/x", "postgres://alice@db/x"),
            ("s3://bucket/a:b@c", "s3://bucket/a:b@c"),
            (
                "\"postgres://u:pw@h\" and 'postgres://v:pw2@h2/d'",
                "\"postgres://u:***@h\" and 'postgres://v:***@h2/d'",
            ),
            ("no url here", "no url here"),
            (
                "postgres://h/d?user=u&password=pw&sslmode=require",
                "postgres://h/d?user=u&password=***&sslmode=require",
            ),
            (
                "host=h PASSWORD=pw dbname=d",
                "host=h PASSWORD=*** dbname=d",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(redact_urls(text), want, "{text}");
        }
    }

    #[test]
    fn known_secrets_are_masked_wherever_they_appear() {
        let redactor = Redactor::new(["hunter2".to_string(), String::new(), "hunter".into()]);
        assert_eq!(
            redactor.redact("FATAL: password hunter2 rejected; hunter"),
            "FATAL: password *** rejected; ***"
        );
        assert_eq!(redactor.redact(""), "");
    }
}
