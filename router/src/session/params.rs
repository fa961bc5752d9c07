//! Session parameters. A client sees the parameters it asked for in its startup packet, and the
//! server connection it is given is made to match before its first message: once in session
//! pooling, on every checkout in transaction pooling (PgBouncer's tracked parameters, for every
//! parameter).
//!
//! The server reports some parameters whenever they change (ParameterStatus: `client_encoding`,
//! `DateStyle`, `TimeZone`, `application_name`, `IntervalStyle`, `standard_conforming_strings`,
//! ...; which ones depends on its version). Those are followed as the client changes them with
//! `SET`, and restored for it on the next server. The others (`statement_timeout`, `search_path`
//! before PostgreSQL 18, ...) are carried as the startup packet set them; a client that `SET`s one
//! of them keeps its server (see [`super::inspect`]).

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::OnceLock;

/// One `name = value` from a client's startup packet.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Setting {
    pub(crate) name: String,
    value: String,
}

impl Setting {
    fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Setting {
            name: name.into(),
            value: value.into(),
        }
    }

    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// A startup packet the router will not carry out.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub(crate) enum StartupError {
    #[error(
        "startup option \"{0}\" is not supported by the router: options may only set parameters (-c name=value or --name=value)"
    )]
    UnsupportedOption(String),
    #[error("startup option \"{0}\" sets no value: use -c name=value")]
    NoValue(String),
    #[error("the router does not relay replication connections")]
    Replication,
}

impl StartupError {
    pub(crate) fn sqlstate(&self) -> &'static str {
        match self {
            StartupError::UnsupportedOption(_) | StartupError::Replication => "0A000",
            StartupError::NoValue(_) => "42601",
        }
    }
}

/// The parameter settings of a startup packet: every entry but `user`, `database`, `options`,
/// `replication` and protocol options (`_pq_.…`), and the `-c name=value` and `--name=value`
/// switches in `options`. As in PostgreSQL, plain entries override `options`, and a later
/// setting an earlier one. Sorted by name, so that equal requests compare equal.
pub(crate) fn startup_settings(params: &[(String, String)]) -> Result<Vec<Setting>, StartupError> {
    let mut settings: Vec<Setting> = Vec::new();
    let mut set = |setting: Setting| {
        settings.retain(|s| !s.is(&setting.name));
        settings.push(setting);
    };
    if let Some((_, options)) = params.iter().find(|(name, _)| name == "options") {
        let mut args = split_options(options).into_iter();
        while let Some(arg) = args.next() {
            let assignment = if arg == "-c" {
                args.next().ok_or(StartupError::NoValue(arg))?
            } else if let Some(rest) = arg.strip_prefix("--").or(arg.strip_prefix("-c")) {
                rest.to_string()
            } else {
                return Err(StartupError::UnsupportedOption(arg));
            };
            let Some((name, value)) = assignment.split_once('=') else {
                return Err(StartupError::NoValue(assignment));
            };
            // PostgreSQL reads dashes in an option's name as underscores.
            set(Setting::new(name.replace('-', "_"), value));
        }
    }
    for (name, value) in params {
        match name.as_str() {
            "user" | "database" | "options" => {}
            "replication" => {
                let off = ["false", "off", "no", "0", "f", "n"];
                if !off.iter().any(|v| value.eq_ignore_ascii_case(v)) {
                    return Err(StartupError::Replication);
                }
            }
            _ if name.starts_with("_pq_.") => {}
            _ => set(Setting::new(name, value)),
        }
    }
    settings.sort_by_key(|s| s.name.to_ascii_lowercase());
    Ok(settings)
}

/// The words of an `options` value, as PostgreSQL splits them: on whitespace, a backslash taking
/// the next character as it is.
fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = options.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return words;
        }
        let mut word = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_ascii_whitespace()) {
            match c {
                '\\' => word.extend(chars.next()),
                c => word.push(c),
            }
        }
        words.push(word);
    }
}

/// Reported parameters that no session sets: never restored, and left out of comparisons.
const READ_ONLY: &[&str] = &[
    "in_hot_standby",
    "integer_datetimes",
    "is_superuser",
    "server_encoding",
    "server_version",
    "session_authorization",
];

/// Parameters a server reports, by lower-case name: the name as the server spells it, and the value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reported(BTreeMap<String, (String, String)>);

impl Reported {
    pub(crate) fn set(&mut self, name: &str, value: &str) {
        match self.0.get_mut(&name.to_ascii_lowercase()) {
            Some((_, v)) => value.clone_into(v),
            None => {
                self.0.insert(
                    name.to_ascii_lowercase(),
                    (name.to_string(), value.to_string()),
                );
            }
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(&name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0.contains_key(&name.to_ascii_lowercase())
    }

    /// (name, value) pairs, by name.
    fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.values().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The ones a session may set, by lower-case name.
    fn settable(&self) -> impl Iterator<Item = (&String, &(String, String))> {
        self.0
            .iter()
            .filter(|(key, _)| !READ_ONLY.contains(&key.as_str()))
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for Reported {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(pairs: I) -> Self {
        let mut reported = Reported::default();
        for (name, value) in pairs {
            reported.set(name, value);
        }
        reported
    }
}

/// Equal for a client and a server whose sessions need no `SET` to match, and (but for a chance of
/// 2^-64) only for them: SipHash with a key drawn at start, so that no client can make its
/// parameters collide with another's. Unreported settings as (name, value), the value `None`
/// when unknown.
fn fingerprint<'a>(
    reported: &Reported,
    unreported: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) -> u64 {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    let mut hasher = KEY.get_or_init(RandomState::new).build_hasher();
    for entry in reported.settable() {
        entry.hash(&mut hasher);
    }
    for entry in unreported {
        entry.hash(&mut hasher);
    }
    hasher.finish()
}

/// A client's parameters: the reported ones as the client has been told them, and the settings
/// it asked for of parameters the server does not report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientParams {
    reported: Reported,
    /// Sorted by name.
    unreported: Vec<Setting>,
    fingerprint: u64,
    /// `standard_conforming_strings`, read on every query.
    standard_strings: bool,
}

impl ClientParams {
    pub(crate) fn new(reported: Reported, mut unreported: Vec<Setting>) -> Self {
        unreported.sort_by_key(|s| s.name.to_ascii_lowercase());
        let mut params = ClientParams {
            reported,
            unreported,
            fingerprint: 0,
            standard_strings: true,
        };
        params.refresh();
        params
    }

    fn refresh(&mut self) {
        let unreported = self.unreported.iter();
        self.fingerprint = fingerprint(
            &self.reported,
            unreported.map(|s| (s.name.as_str(), Some(s.value.as_str()))),
        );
        self.standard_strings = self.reported.get("standard_conforming_strings") != Some("off");
    }

    /// What the client is told at login.
    pub(crate) fn reported(&self) -> impl Iterator<Item = (&str, &str)> {
        self.reported.iter()
    }

    /// Whether the server reports this parameter, so that a change to it is seen.
    pub(crate) fn is_reported(&self, name: &str) -> bool {
        self.reported.contains(name)
    }

    /// A ParameterStatus the client was sent: its session's new value.
    pub(crate) fn observe(&mut self, name: &str, value: &str) {
        if self.reported.get(name) != Some(value) {
            self.reported.set(name, value);
            self.refresh();
        }
    }

    /// Whether backslashes in ordinary string literals are literal, as the client's SQL is read.
    pub(crate) fn standard_conforming_strings(&self) -> bool {
        self.standard_strings
    }

    pub(crate) fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// A server connection's session parameters.
#[derive(Clone, Debug)]
pub(crate) struct ServerParams {
    /// As reported at login: the values a reset returns to.
    startup: Reported,
    /// As last reported.
    reported: Reported,
    /// Parameters the server does not report that the router set, sorted by name, with their
    /// value; `None` when a client may have changed it since (`RESET`).
    applied: Vec<(String, Option<String>)>,
    fingerprint: u64,
}

impl ServerParams {
    pub(crate) fn new(startup: Reported) -> Self {
        let mut params = ServerParams {
            reported: startup.clone(),
            startup,
            applied: Vec::new(),
            fingerprint: 0,
        };
        params.refresh();
        params
    }

    /// The parameters as the server reported them at login.
    pub(crate) fn startup(&self) -> &Reported {
        &self.startup
    }

    pub(crate) fn reported(&self) -> &Reported {
        &self.reported
    }

    /// A ParameterStatus from the server.
    pub(crate) fn observe(&mut self, name: &str, value: &str) {
        if self.reported.get(name) != Some(value) {
            self.reported.set(name, value);
            self.refresh();
        }
    }

    /// The session was reset (`DISCARD ALL` on a connection nobody holds): every parameter is
    /// back to its value at login.
    pub(crate) fn reset(&mut self) {
        self.reported = self.startup.clone();
        self.applied.clear();
        self.refresh();
    }

    /// Settings the router made may have been undone (`RESET`, `DISCARD ALL`), or not (the
    /// statement failed): reset them for the next client, or set them again.
    pub(crate) fn forget_applied(&mut self) {
        if self.applied.iter().any(|(_, value)| value.is_some()) {
            for (_, value) in &mut self.applied {
                *value = None;
            }
            self.refresh();
        }
    }

    /// `SET`s made for `client`, and nothing else.
    pub(crate) fn applied(&mut self, client: &ClientParams) {
        self.applied = client
            .unreported
            .iter()
            .map(|s| (s.name.clone(), Some(s.value.clone())))
            .collect();
        self.refresh();
    }

    pub(crate) fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    fn refresh(&mut self) {
        let applied = self.applied.iter();
        self.fingerprint = fingerprint(
            &self.reported,
            applied.map(|(name, value)| (name.as_str(), value.as_deref())),
        );
    }

    /// Whether the router set `setting` here, and it still holds.
    fn holds(&self, setting: &Setting) -> bool {
        self.applied
            .iter()
            .any(|(name, value)| setting.is(name) && value.as_deref() == Some(&setting.value))
    }

    /// The query that makes this session's parameters the client's, if any differ. Checked on
    /// every checkout: equal fingerprints are taken to mean equal parameters.
    pub(crate) fn sync_query(&self, client: &ClientParams) -> Option<String> {
        if client.fingerprint == self.fingerprint {
            return None;
        }
        let resets = self
            .applied
            .iter()
            .filter(|(name, _)| !client.unreported.iter().any(|c| c.is(name)))
            .map(|(name, _)| name.as_str());
        let reported = client
            .reported
            .settable()
            .filter(|(key, (_, value))| self.reported.get(key) != Some(value.as_str()))
            .map(|(_, (name, value))| (name.as_str(), value.as_str()));
        let unreported = client
            .unreported
            .iter()
            .filter(|c| !self.holds(c))
            .map(|c| (c.name.as_str(), c.value.as_str()));
        compose(false, resets, reported.chain(unreported))
    }
}

/// The query that starts a client's session on a server: every parameter back to its default,
/// then the client's settings, each as PostgreSQL reads a startup parameter (`set_config`, not
/// `SET`, so that `search_path=a,b` is two schemas).
pub(crate) fn establish_query(settings: &[Setting]) -> String {
    let sets = settings.iter().map(|s| (s.name.as_str(), s.value.as_str()));
    compose(true, std::iter::empty(), sets).unwrap_or_else(|| "RESET ALL".to_string())
}

fn compose<'a>(
    reset_all: bool,
    resets: impl Iterator<Item = &'a str>,
    sets: impl Iterator<Item = (&'a str, &'a str)>,
) -> Option<String> {
    let mut query = String::new();
    if reset_all {
        query.push_str("RESET ALL; ");
    }
    for name in resets {
        query.push_str("RESET ");
        quote_identifier(&mut query, name);
        query.push_str("; ");
    }
    let mut first = true;
    for (name, value) in sets {
        query.push_str(if first { "SELECT " } else { ", " });
        first = false;
        query.push_str("pg_catalog.set_config(");
        quote_literal(&mut query, name);
        query.push_str(", ");
        quote_literal(&mut query, value);
        query.push_str(", false)");
    }
    let query = query.trim_end_matches([';', ' ']);
    (!query.is_empty()).then(|| query.to_string())
}

/// `E'...'`: read the same whatever `standard_conforming_strings` is.
fn quote_literal(out: &mut String, s: &str) {
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
}

fn quote_identifier(out: &mut String, s: &str) {
    out.push('"');
    out.push_str(&s.replace('"', "\"\""));
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn settings(pairs: &[(&str, &str)]) -> Vec<Setting> {
        pairs.iter().map(|(k, v)| Setting::new(*k, *v)).collect()
    }

    #[test]
    fn startup_settings_read_parameters_and_options() {
        let got = startup_settings(&startup(&[
            ("user", "app"),
            ("database", "acme"),
            ("application_name", "app-1"),
            (
                "options",
                r"-c statement_timeout=5s --lock-timeout=1s -csearch_path=a,\ b",
            ),
            ("_pq_.compression", "on"),
            ("replication", "false"),
        ]));
        assert_eq!(
            got,
            Ok(settings(&[
                ("application_name", "app-1"),
                ("lock_timeout", "1s"),
                ("search_path", "a, b"),
                ("statement_timeout", "5s"),
            ]))
        );
    }

    #[test]
    fn plain_parameters_override_options() {
        let got = startup_settings(&startup(&[
            ("options", "-c TimeZone=UTC -c timezone=Asia/Tokyo"),
            ("timezone", "Europe/Paris"),
        ]));
        assert_eq!(got, Ok(settings(&[("timezone", "Europe/Paris")])));
    }

    #[test]
    fn what_the_router_cannot_carry_is_refused() {
        for (options, error) in [
            ("-e", StartupError::UnsupportedOption("-e".into())),
            ("-B 100", StartupError::UnsupportedOption("-B".into())),
            ("-c", StartupError::NoValue("-c".into())),
            (
                "-c statement_timeout",
                StartupError::NoValue("statement_timeout".into()),
            ),
        ] {
            assert_eq!(
                startup_settings(&startup(&[("options", options)])),
                Err(error),
                "{options}"
            );
        }
        assert_eq!(
            startup_settings(&startup(&[("replication", "database")])),
            Err(StartupError::Replication)
        );
    }

    fn server() -> ServerParams {
        ServerParams::new(Reported::from_iter([
            ("application_name", "silo-router"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("server_version", "15.8"),
            ("TimeZone", "UTC"),
        ]))
    }

    #[test]
    fn a_matching_server_needs_nothing() {
        let server = server();
        let client = ClientParams::new(server.reported().clone(), Vec::new());
        assert_eq!(client.fingerprint(), server.fingerprint());
        assert_eq!(server.sync_query(&client), None);
    }

    #[test]
    fn a_server_is_set_to_the_clients_parameters() {
        let mut server = server();
        server.applied(&ClientParams::new(
            Reported::default(),
            settings(&[("statement_timeout", "1s"), ("lock_timeout", "2s")]),
        ));
        let mut reported = server.reported().clone();
        reported.set("timezone", "Asia/Tokyo");
        reported.set("application_name", "it's");
        // Whatever the server reports of itself is not "restored".
        reported.set("server_version", "14");
        let client = ClientParams::new(
            reported,
            settings(&[("statement_timeout", "1s"), ("work_mem", r"64\MB")]),
        );
        assert_ne!(client.fingerprint(), server.fingerprint());
        assert_eq!(
            server.sync_query(&client).as_deref(),
            Some(
                r#"RESET "lock_timeout"; SELECT pg_catalog.set_config(E'application_name', E'it''s', false), pg_catalog.set_config(E'TimeZone', E'Asia/Tokyo', false), pg_catalog.set_config(E'work_mem', E'64\\MB', false)"#
            )
        );
        // Once the server reports the new values and holds the client's settings, they match.
        server.observe("TimeZone", "Asia/Tokyo");
        server.observe("application_name", "it's");
        server.applied(&client);
        assert_eq!(server.sync_query(&client), None);
        assert_eq!(client.fingerprint(), server.fingerprint());
        // After a RESET the router no longer knows: the client's are set again, and another
        // client's reset.
        server.forget_applied();
        assert_ne!(client.fingerprint(), server.fingerprint());
        assert_eq!(
            server.sync_query(&client).as_deref(),
            Some(
                r#"SELECT pg_catalog.set_config(E'statement_timeout', E'1s', false), pg_catalog.set_config(E'work_mem', E'64\\MB', false)"#
            )
        );
        let other = ClientParams::new(server.reported().clone(), Vec::new());
        assert_eq!(
            server.sync_query(&other).as_deref(),
            Some(r#"RESET "statement_timeout"; RESET "work_mem""#)
        );
        server.reset();
        assert_eq!(server.reported(), server.startup());
        assert!(server.sync_query(&client).is_some());
        let fresh = ClientParams::new(server.startup().clone(), Vec::new());
        assert_eq!(server.sync_query(&fresh), None);
    }

    #[test]
    fn the_client_follows_what_it_is_told() {
        let mut client = ClientParams::new(server().reported().clone(), Vec::new());
        assert!(client.standard_conforming_strings());
        client.observe("standard_conforming_strings", "off");
        assert!(!client.standard_conforming_strings());
        client.observe("TIMEZONE", "Europe/Paris");
        assert_eq!(
            client.reported().find(|(n, _)| *n == "TimeZone"),
            Some(("TimeZone", "Europe/Paris"))
        );
        assert!(client.is_reported("timezone") && !client.is_reported("statement_timeout"));
    }

    #[test]
    fn establishing_resets_then_sets() {
        assert_eq!(establish_query(&[]), "RESET ALL");
        assert_eq!(
            establish_query(&settings(&[("search_path", "a, b")])),
            "RESET ALL; SELECT pg_catalog.set_config(E'search_path', E'a, b', false)"
        );
    }
}
