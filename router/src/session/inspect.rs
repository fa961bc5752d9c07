//! What a client's SQL does to its session that transaction pooling must know: state that cannot
//! follow the client to another server connection (the server then stays with the client until
//! it leaves: it is *pinned*), and prepared statements dropped (the router's own with them).
//!
//! A lexical scan, not a parser, made to err on the side of pinning. It skips comments, string
//! literals and quoted identifiers, so that data never pins, and reads dollar-quoted bodies as
//! code, so that a `DO` block taking an advisory lock does. It cannot see state made by a function
//! called by name, or by dynamic SQL inside one.

/// Why a client keeps its server connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pin {
    /// `CREATE TEMP TABLE`, `SELECT ... INTO TEMP`, `pg_temp.` objects.
    Temporary,
    /// `pg_advisory_lock` and friends, held until unlocked or the session ends.
    AdvisoryLock,
    Listen,
    /// SQL-level `PREPARE` (statements prepared in the protocol are carried: [`super::prepared`]).
    Prepare,
    /// `DECLARE ... WITH HOLD`: a cursor that outlives its transaction.
    HoldCursor,
    /// `SET`, `set_config` (not local) or `SET ROLE` of a parameter the server does not report.
    Setting,
}

impl Pin {
    /// A metric label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Pin::Temporary => "temporary_object",
            Pin::AdvisoryLock => "advisory_lock",
            Pin::Listen => "listen",
            Pin::Prepare => "sql_prepare",
            Pin::HoldCursor => "hold_cursor",
            Pin::Setting => "setting",
        }
    }
}

/// Prepared statements a statement drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Deallocate {
    /// `DEALLOCATE name`: any of them, as far as the router knows.
    One,
    /// `DEALLOCATE ALL`, `DISCARD ALL`: all of them.
    All,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Effects {
    /// The first reason found to pin the server, if any.
    pub(crate) pin: Option<Pin>,
    pub(crate) deallocate: Option<Deallocate>,
    /// `RESET`, `RESET ALL`, `DISCARD ALL`: parameters may be back at the server's defaults.
    pub(crate) resets: bool,
}

impl Effects {
    fn pin(&mut self, pin: Pin) {
        self.pin.get_or_insert(pin);
    }

    fn deallocate(&mut self, d: Deallocate) {
        self.deallocate = self.deallocate.max(Some(d));
    }
}

/// How the SQL text is read.
pub(crate) struct Reading<'a> {
    /// `standard_conforming_strings` as the client's session has it: when off, a backslash
    /// escapes a quote in an ordinary string literal.
    pub(crate) standard_strings: bool,
    /// Whether the server reports a parameter (by lower-case name), so that setting it need not pin.
    pub(crate) reported: &'a dyn Fn(&str) -> bool,
}

/// The effects of one simple Query or Parse'd statement.
pub(crate) fn inspect(sql: &[u8], reading: &Reading<'_>) -> Effects {
    let mut effects = Effects::default();
    scan(sql, reading, 0, &mut effects);
    effects
}

/// Nested dollar-quoted bodies read as code, at most (real ones nest two deep).
const MAX_NESTING: usize = 8;

fn scan(sql: &[u8], reading: &Reading<'_>, depth: usize, effects: &mut Effects) {
    let mut lexer = Lexer::new(sql, reading.standard_strings);
    let mut at_start = true;
    while let Some(token) = lexer.next() {
        let start = std::mem::replace(&mut at_start, false);
        match token {
            Token::Punct(b';') => at_start = true,
            Token::Dollar(body) if depth < MAX_NESTING => scan(body, reading, depth + 1, effects),
            Token::Word(word) => {
                if start {
                    statement(word, lexer.clone(), reading, effects);
                }
                anywhere(word, lexer.clone(), reading, effects);
                // PL/pgSQL statements start after these too.
                at_start = ["begin", "then", "else", "loop"]
                    .iter()
                    .any(|k| word.eq_ignore_ascii_case(k.as_bytes()));
            }
            Token::Quoted(name) if starts_with_ignore_case(name, b"pg_temp") => {
                effects.pin(Pin::Temporary)
            }
            _ => {}
        }
    }
}

/// Statements recognised by their first word.
fn statement(word: &[u8], mut rest: Lexer<'_>, reading: &Reading<'_>, effects: &mut Effects) {
    let is = |k: &str| word.eq_ignore_ascii_case(k.as_bytes());
    if is("listen") {
        effects.pin(Pin::Listen);
    } else if is("prepare") {
        // PREPARE TRANSACTION leaves nothing in the session.
        if !rest.next().is_some_and(|t| t.is_word("transaction")) {
            effects.pin(Pin::Prepare);
        }
    } else if is("deallocate") {
        let mut next = rest.next();
        if next.is_some_and(|t| t.is_word("prepare")) {
            next = rest.next();
        }
        effects.deallocate(if next.is_some_and(|t| t.is_word("all")) {
            Deallocate::All
        } else {
            Deallocate::One
        });
    } else if is("discard") {
        if rest.next().is_some_and(|t| t.is_word("all")) {
            effects.deallocate(Deallocate::All);
            effects.resets = true;
        }
    } else if is("set") {
        if let Some(name) = set_target(rest)
            && !name.is_some_and(|n| (reading.reported)(&n))
        {
            effects.pin(Pin::Setting);
        }
    } else if is("reset") {
        // Back to the server connection's default, which the router then sets again if the
        // client had asked for another value.
        effects.resets = true;
        if matches!(rest.next(), Some(t) if t.is_word("role") || t.is_word("session")) {
            effects.pin(Pin::Setting);
        }
    }
}

/// The parameter a `SET` sets, lower-cased: `Some(None)` when it is not a parameter by name
/// (`SET SESSION AUTHORIZATION`, ...), `None` when the statement leaves nothing in the session
/// (`SET LOCAL`, `SET TRANSACTION`, `SET CONSTRAINTS`).
fn set_target(mut rest: Lexer<'_>) -> Option<Option<String>> {
    let mut token = rest.next();
    if token.is_some_and(|t| t.is_word("session")) {
        token = rest.next();
        if token.is_some_and(|t| t.is_word("characteristics") || t.is_word("authorization")) {
            return Some(None);
        }
    }
    let name = match token {
        Some(t) if t.is_word("local") || t.is_word("transaction") || t.is_word("constraints") => {
            return None;
        }
        Some(t) if t.is_word("time") => "timezone".to_string(),
        Some(t) if t.is_word("names") => "client_encoding".to_string(),
        Some(t) if t.is_word("schema") => "search_path".to_string(),
        Some(t) if t.is_word("xml") => "xmloption".to_string(),
        Some(Token::Word(first) | Token::Quoted(first)) => {
            let mut name = String::from_utf8_lossy(first).to_ascii_lowercase();
            while rest.next() == Some(Token::Punct(b'.')) {
                match rest.next() {
                    Some(Token::Word(part) | Token::Quoted(part)) => {
                        name.push('.');
                        name.push_str(&String::from_utf8_lossy(part).to_ascii_lowercase());
                    }
                    _ => break,
                }
            }
            name
        }
        _ => return Some(None),
    };
    Some(Some(name))
}

const ADVISORY_LOCKS: [&str; 4] = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// Words that matter wherever they are.
fn anywhere(word: &[u8], mut rest: Lexer<'_>, reading: &Reading<'_>, effects: &mut Effects) {
    let is = |k: &str| word.eq_ignore_ascii_case(k.as_bytes());
    if is("temp") || is("temporary") || starts_with_ignore_case(word, b"pg_temp") {
        effects.pin(Pin::Temporary);
    } else if ADVISORY_LOCKS.iter().any(|k| is(k)) {
        effects.pin(Pin::AdvisoryLock);
    } else if is("with") {
        if rest.next().is_some_and(|t| t.is_word("hold")) {
            effects.pin(Pin::HoldCursor);
        }
    } else if is("set_config")
        && rest.next() == Some(Token::Punct(b'('))
        && !set_config_is_harmless(rest, reading)
    {
        effects.pin(Pin::Setting);
    }
}

/// `set_config(name, value, is_local)` with `is_local` true, or of a reported parameter.
fn set_config_is_harmless(rest: Lexer<'_>, reading: &Reading<'_>) -> bool {
    let mut depth = 1;
    let mut arg = 0;
    let mut args: [Vec<Token<'_>>; 3] = Default::default();
    for token in rest {
        match token {
            Token::Punct(b'(') => depth += 1,
            Token::Punct(b')') => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Token::Punct(b',') if depth == 1 => {
                arg += 1;
                continue;
            }
            _ => {}
        }
        match args.get_mut(arg) {
            Some(tokens) if tokens.len() < 2 => tokens.push(token),
            _ => {}
        }
    }
    let local = matches!(args[2].as_slice(), [t] if t.is_word("true"));
    let reported = matches!(args[0].as_slice(), [Token::Str(name)]
        if (reading.reported)(&String::from_utf8_lossy(name).to_ascii_lowercase()));
    local || reported
}

fn starts_with_ignore_case(word: &[u8], prefix: &[u8]) -> bool {
    word.len() >= prefix.len() && word[..prefix.len()].eq_ignore_ascii_case(prefix)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token<'a> {
    /// A keyword or unquoted identifier.
    Word(&'a [u8]),
    /// A quoted identifier's text.
    Quoted(&'a [u8]),
    /// A string literal's text, as written.
    Str(&'a [u8]),
    /// The body of a dollar-quoted string.
    Dollar(&'a [u8]),
    Punct(u8),
    /// Numbers, operators, parameters.
    Other,
}

impl Token<'_> {
    fn is_word(&self, keyword: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(keyword.as_bytes()))
    }
}

#[derive(Clone)]
struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    standard_strings: bool,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

impl<'a> Lexer<'a> {
    fn new(src: &'a [u8], standard_strings: bool) -> Self {
        Lexer {
            src,
            pos: 0,
            standard_strings,
        }
    }

    fn peek_at(&self, offset: usize) -> Option<u8> {
        self.src.get(self.pos + offset).copied()
    }

    /// A literal or quoted identifier from its opening `quote`; `escapes` when a backslash
    /// escapes the next character. Its text stops at the closing quote, or the end.
    fn quoted(&mut self, quote: u8, escapes: bool) -> &'a [u8] {
        self.pos += 1;
        let start = self.pos;
        while let Some(c) = self.peek_at(0) {
            let escaped = (c == b'\\' && escapes) || (c == quote && self.peek_at(1) == Some(quote));
            if escaped {
                self.pos += 2;
            } else if c == quote {
                self.pos += 1;
                return &self.src[start..self.pos - 1];
            } else {
                self.pos += 1;
            }
        }
        self.pos = self.src.len();
        &self.src[start.min(self.src.len())..]
    }

    /// At a `$`: a dollar-quoted body, or None (a parameter, or a lone `$`).
    fn dollar(&mut self) -> Option<&'a [u8]> {
        let rest = &self.src[self.pos + 1..];
        let tag_len = rest.iter().position(|c| *c == b'$')?;
        let tag = &rest[..tag_len];
        let valid = tag.first().is_none_or(|c| is_ident_start(*c))
            && tag.iter().all(|c| is_ident_char(*c) && *c != b'$');
        if !valid {
            return None;
        }
        let delimiter = &self.src[self.pos..self.pos + tag_len + 2];
        let body_start = self.pos + delimiter.len();
        let body = &self.src[body_start..];
        match body.windows(delimiter.len()).position(|w| w == delimiter) {
            Some(end) => {
                self.pos = body_start + end + delimiter.len();
                Some(&body[..end])
            }
            None => {
                self.pos = self.src.len();
                Some(body)
            }
        }
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        loop {
            let c = self.peek_at(0)?;
            match c {
                c if c.is_ascii_whitespace() => self.pos += 1,
                b'-' if self.peek_at(1) == Some(b'-') => {
                    match self.src[self.pos..].iter().position(|c| *c == b'\n') {
                        Some(n) => self.pos += n + 1,
                        None => self.pos = self.src.len(),
                    }
                }
                b'/' if self.peek_at(1) == Some(b'*') => {
                    // Block comments nest.
                    let mut depth = 0;
                    while self.pos < self.src.len() {
                        match (self.peek_at(0), self.peek_at(1)) {
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.pos += 2;
                            }
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.pos += 2;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => self.pos += 1,
                        }
                    }
                }
                b'\'' => return Some(Token::Str(self.quoted(b'\'', !self.standard_strings))),
                b'"' => return Some(Token::Quoted(self.quoted(b'"', false))),
                b'$' => {
                    if let Some(body) = self.dollar() {
                        return Some(Token::Dollar(body));
                    }
                    self.pos += 1;
                    while self.peek_at(0).is_some_and(|c| c.is_ascii_digit()) {
                        self.pos += 1;
                    }
                    return Some(Token::Other);
                }
                c if is_ident_start(c) => {
                    let start = self.pos;
                    while self.peek_at(0).is_some_and(is_ident_char) {
                        self.pos += 1;
                    }
                    let word = &self.src[start..self.pos];
                    // E'...' always reads backslash escapes; U&'...', B'...', X'...', N'...' are
                    // ordinary literals with a prefix.
                    if self.peek_at(0) == Some(b'\'') && word.len() == 1 {
                        let escapes = word.eq_ignore_ascii_case(b"e") || !self.standard_strings;
                        return Some(Token::Str(self.quoted(b'\'', escapes)));
                    }
                    if word.eq_ignore_ascii_case(b"u")
                        && self.peek_at(0) == Some(b'&')
                        && self.peek_at(1) == Some(b'\'')
                    {
                        self.pos += 1;
                        return Some(Token::Str(self.quoted(b'\'', false)));
                    }
                    return Some(Token::Word(word));
                }
                c if c.is_ascii_digit() => {
                    while self
                        .peek_at(0)
                        .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_')
                    {
                        self.pos += 1;
                    }
                    return Some(Token::Other);
                }
                b';' | b'(' | b')' | b',' | b'.' | b'=' => {
                    self.pos += 1;
                    return Some(Token::Punct(c));
                }
                _ => {
                    self.pos += 1;
                    return Some(Token::Other);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORTED: [&str; 5] = [
        "application_name",
        "client_encoding",
        "datestyle",
        "standard_conforming_strings",
        "timezone",
    ];

    fn effects(sql: &str) -> Effects {
        effects_with(sql, true)
    }

    fn effects_with(sql: &str, standard_strings: bool) -> Effects {
        let reported = |name: &str| REPORTED.contains(&name);
        inspect(
            sql.as_bytes(),
            &Reading {
                standard_strings,
                reported: &reported,
            },
        )
    }

    fn pin(sql: &str) -> Option<Pin> {
        effects(sql).pin
    }

    #[test]
    fn state_that_cannot_move_pins() {
        for (sql, expected) in [
            ("CREATE TEMP TABLE t (x int)", Pin::Temporary),
            ("create local temporary table t as select 1", Pin::Temporary),
            ("SELECT 1 INTO TEMP t", Pin::Temporary),
            ("CREATE TABLE pg_temp.t (x int)", Pin::Temporary),
            ("CREATE VIEW \"pg_temp\".v AS SELECT 1", Pin::Temporary),
            ("SELECT pg_advisory_lock(42)", Pin::AdvisoryLock),
            (
                "select pg_catalog.PG_TRY_ADVISORY_LOCK_SHARED($1)",
                Pin::AdvisoryLock,
            ),
            ("LISTEN orders", Pin::Listen),
            ("PREPARE q AS SELECT 1", Pin::Prepare),
            ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", Pin::HoldCursor),
            ("SET statement_timeout = '5s'", Pin::Setting),
            ("SET SESSION search_path TO a, b", Pin::Setting),
            ("SET SCHEMA 'a'", Pin::Setting),
            ("SET myapp.tenant = 7", Pin::Setting),
            ("SET ROLE reporting", Pin::Setting),
            ("RESET ROLE", Pin::Setting),
            ("SET SESSION AUTHORIZATION DEFAULT", Pin::Setting),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                Pin::Setting,
            ),
            ("SELECT set_config('search_path', 'a', false)", Pin::Setting),
            ("SELECT set_config($1, $2, $3)", Pin::Setting),
            ("BEGIN; SELECT 1; LISTEN x; COMMIT", Pin::Listen),
            (
                "DO $$ BEGIN PERFORM pg_advisory_lock(1); END $$",
                Pin::AdvisoryLock,
            ),
            (
                "DO $body$ DECLARE n int; BEGIN SET work_mem = '1GB'; END $body$",
                Pin::Setting,
            ),
        ] {
            assert_eq!(pin(sql), Some(expected), "{sql}");
        }
    }

    #[test]
    fn what_the_router_carries_does_not_pin() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            "UPDATE t SET statement_timeout = 1",
            "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET n = 2",
            "ALTER ROLE app SET search_path = a",
            "CREATE FUNCTION f() RETURNS int SET search_path = a AS 'SELECT 1' LANGUAGE sql",
            "SET TimeZone = 'Europe/Paris'",
            "SET TIME ZONE 'UTC'",
            "set names 'LATIN1'",
            "SET SESSION datestyle TO German",
            "SET \"DateStyle\" = ISO",
            "SET LOCAL statement_timeout = '1s'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "SELECT set_config('myapp.tenant', $1, true)",
            "SELECT set_config('application_name', 'x', false)",
            "SELECT pg_advisory_xact_lock(1)",
            "PREPARE TRANSACTION 'tx1'",
            "DECLARE c CURSOR FOR SELECT 1",
            "SELECT 'listen; create temp table t' -- LISTEN x\n",
            "SELECT /* LISTEN /* nested */ x */ 1",
            "SELECT \"listen\", \"temp\" FROM t",
            "SELECT E'it\\'s; LISTEN x'",
            "SELECT $1::text, $$it's$$, 'temp'",
            "SELECT $a$ SELECT '$a$",
        ] {
            assert_eq!(pin(sql), None, "{sql}");
        }
    }

    #[test]
    fn backslashes_follow_standard_conforming_strings() {
        // Off: the backslash escapes the quote and LISTEN is inside the string.
        assert_eq!(effects_with(r"SELECT 'a\'; LISTEN x; --'", false).pin, None);
        // On: the string ends at the backslash and LISTEN runs.
        assert_eq!(
            effects_with(r"SELECT 'a\'; LISTEN x; --'", true).pin,
            Some(Pin::Listen)
        );
        // E'' strings escape either way.
        assert_eq!(
            effects_with(r"SELECT e'\''; LISTEN x", true).pin,
            Some(Pin::Listen)
        );
    }

    #[test]
    fn deallocations_and_resets_are_seen() {
        let all = Some(Deallocate::All);
        assert_eq!(effects("DEALLOCATE ALL").deallocate, all);
        assert_eq!(effects("deallocate prepare all").deallocate, all);
        assert_eq!(
            effects("DEALLOCATE _pg3_0").deallocate,
            Some(Deallocate::One)
        );
        assert_eq!(
            effects("DEALLOCATE x; DEALLOCATE ALL").deallocate,
            all,
            "the widest wins"
        );
        let discard = effects("DISCARD ALL");
        assert!(discard.deallocate == all && discard.resets && discard.pin.is_none());
        assert_eq!(effects("DISCARD PLANS"), Effects::default());
        assert!(effects("RESET ALL").resets);
        assert!(effects("reset statement_timeout").resets);
        assert_eq!(effects("SELECT 'DEALLOCATE ALL'"), Effects::default());
    }

    #[test]
    fn arbitrary_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let alphabet = b"$'\"-/*;(),.=\\ aeEtU&lis0_\n";
        for _ in 0..20_000 {
            let len = rng.random_range(0..40);
            let sql: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let _ = effects_with(&String::from_utf8_lossy(&sql), rng.random_bool(0.5));
        }
    }
}
