//! Apache htpasswd files, in every format the `htpasswd` tool and its friends write.
//!
//! | format | written by | verified with |
//! |---|---|---|
//! | `$2y$`, `$2a$`, `$2b$`, `$2x$` | `htpasswd -B` | the `bcrypt` crate |
//! | `$apr1$` | `htpasswd -m` (the default) | MD5-crypt over `md-5`, below |
//! | `$1$` (weak) | `openssl passwd -1` | MD5-crypt over `md-5`, below |
//! | `$5$`, `$6$` | `openssl passwd -5/-6`, `mkpasswd` | the `sha-crypt` crate |
//! | `{SHA}` | `htpasswd -s` | `sha1` |
//! | `{SSHA}` | LDAP tools | `sha1` |
//! | 13-character DES crypt (weak) | `htpasswd -d` | the `pwhash` crate (feature `des-crypt`) |
//! | plain text | `htpasswd -p` | only with `htpasswd_plaintext = true` |
//!
//! Parsing does every check a verification would need, so an entry that loads can always be
//! verified: an unsupported or damaged entry is a load error naming its line, never a silent
//! "always deny". Every comparison of a computed hash with a stored one is constant-time.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use md5::{Digest as _, Md5};
use sha1::Sha1;
use subtle::ConstantTimeEq;

use crate::diag::{Diagnostic, Source};

/// Highest bcrypt cost accepted: cost 17 already takes about 10 s per verification here.
pub const MAX_BCRYPT_COST: u32 = 17;
/// Highest SHA-crypt rounds accepted (the default is 5000).
pub const MAX_SHA_CRYPT_ROUNDS: u32 = 1_000_000;

/// A stored password hash, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hash {
    Bcrypt(String),
    /// MD5-crypt; `magic` is `$apr1$` or `$1$`.
    Md5Crypt {
        magic: &'static str,
        salt: String,
        full: String,
    },
    ShaCrypt(String),
    Sha1([u8; 20]),
    Ssha {
        digest: [u8; 20],
        salt: Vec<u8>,
    },
    DesCrypt(String),
    Plain(String),
}

impl Hash {
    /// A short name for logs and metrics.
    pub fn scheme(&self) -> &'static str {
        match self {
            Hash::Bcrypt(_) => "bcrypt",
            Hash::Md5Crypt {
                magic: "$apr1$", ..
            } => "apr1",
            Hash::Md5Crypt { .. } => "md5-crypt",
            Hash::ShaCrypt(s) if s.starts_with("$5$") => "sha256-crypt",
            Hash::ShaCrypt(_) => "sha512-crypt",
            Hash::Sha1(_) => "sha1",
            Hash::Ssha { .. } => "ssha",
            Hash::DesCrypt(_) => "des-crypt",
            Hash::Plain(_) => "plain",
        }
    }

    /// Slow hashes are verified off the async reactor and their successes cached.
    pub fn is_slow(&self) -> bool {
        matches!(
            self,
            Hash::Bcrypt(_) | Hash::Md5Crypt { .. } | Hash::ShaCrypt(_)
        )
    }

    /// Weak schemes load with a warning naming the users to migrate.
    pub fn is_weak(&self) -> bool {
        matches!(
            self,
            Hash::Md5Crypt { magic: "$1$", .. }
                | Hash::DesCrypt(_)
                | Hash::Sha1(_)
                | Hash::Plain(_)
        )
    }

    /// The stored text, for cache keys: a changed entry never matches an old cache entry.
    fn stored(&self) -> String {
        match self {
            Hash::Bcrypt(s) | Hash::ShaCrypt(s) | Hash::DesCrypt(s) | Hash::Plain(s) => s.clone(),
            Hash::Md5Crypt { full, .. } => full.clone(),
            Hash::Sha1(d) => format!("{{SHA}}{}", b64(d)),
            Hash::Ssha { digest, salt } => {
                format!("{{SSHA}}{}", b64(&[&digest[..], salt].concat()))
            }
        }
    }

    /// Whether `password` matches. Slow for bcrypt, SHA-crypt and MD5-crypt: call it off the
    /// async reactor.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            Hash::Md5Crypt { magic, salt, full } => {
                let computed = md5_crypt(password, salt.as_bytes(), magic);
                bool::from(computed.as_bytes().ct_eq(full.as_bytes()))
            }
            Hash::ShaCrypt(h) => {
                use sha_crypt::PasswordVerifier;
                sha_crypt::ShaCrypt::default()
                    .verify_password(password, h.as_str())
                    .is_ok()
            }
            Hash::Sha1(d) => bool::from(Sha1::digest(password).as_slice().ct_eq(d)),
            Hash::Ssha { digest, salt } => {
                let mut h = Sha1::new();
                h.update(password);
                h.update(salt);
                bool::from(h.finalize().as_slice().ct_eq(digest))
            }
            Hash::DesCrypt(h) => des_verify(password, h),
            Hash::Plain(p) => bool::from(password.ct_eq(p.as_bytes())),
        }
    }

    /// A hash of the same scheme and cost as this one, for a password nobody knows: verifying
    /// against it costs what verifying against this entry costs.
    pub fn decoy(&self) -> Hash {
        let mut secret = [0u8; 18];
        let _ = getrandom::fill(&mut secret);
        let password = b64(&secret);
        let salt: String = password
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(8)
            .collect();
        match self {
            Hash::Bcrypt(h) => {
                let cost = h.get(4..6).and_then(|c| c.parse().ok()).unwrap_or(10);
                let mut raw_salt = [0u8; 16];
                let _ = getrandom::fill(&mut raw_salt);
                match bcrypt::hash_with_salt(&password, cost, raw_salt) {
                    Ok(p) => Hash::Bcrypt(p.format_for_version(bcrypt::Version::TwoY)),
                    Err(_) => Hash::Plain(password),
                }
            }
            Hash::Md5Crypt { magic, .. } => Hash::Md5Crypt {
                magic,
                full: md5_crypt(password.as_bytes(), salt.as_bytes(), magic),
                salt,
            },
            Hash::ShaCrypt(h) => {
                let rounds = h
                    .split('$')
                    .find_map(|f| f.strip_prefix("rounds="))
                    .and_then(|r| r.parse::<u32>().ok())
                    .unwrap_or(5000);
                use sha_crypt::CustomizedPasswordHasher;
                let params = sha_crypt::Params::new(rounds).unwrap_or_default();
                let algorithm = if h.starts_with("$5$") {
                    sha_crypt::Algorithm::Sha256Crypt
                } else {
                    sha_crypt::Algorithm::Sha512Crypt
                };
                let encoded = sha_crypt::ShaCrypt::from(algorithm)
                    .hash_password_customized(
                        password.as_bytes(),
                        salt.as_bytes(),
                        None,
                        None,
                        params,
                    )
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|_| h.clone());
                Hash::ShaCrypt(encoded)
            }
            // Fast schemes: a mismatching hash of the same kind costs the same.
            Hash::Sha1(_) => Hash::Sha1(Sha1::digest(password.as_bytes()).into()),
            Hash::Ssha { salt, .. } => Hash::Ssha {
                digest: Sha1::digest(password.as_bytes()).into(),
                salt: salt.clone(),
            },
            Hash::DesCrypt(h) => Hash::DesCrypt(h.clone()),
            Hash::Plain(_) => Hash::Plain(password),
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(feature = "des-crypt")]
#[allow(deprecated)] // DES crypt is deprecated for new passwords; here it only checks old ones.
fn des_verify(password: &[u8], hash: &str) -> bool {
    // pwhash compares in its own way; recompute and compare in constant time instead.
    match pwhash::unix_crypt::hash_with(&hash[..2], password) {
        Ok(computed) => bool::from(computed.as_bytes().ct_eq(hash.as_bytes())),
        Err(_) => false,
    }
}

#[cfg(not(feature = "des-crypt"))]
fn des_verify(_password: &[u8], _hash: &str) -> bool {
    // Unreachable: without the feature, DES entries are load errors.
    false
}

const CRYPT_B64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn to64(out: &mut String, mut v: u32, n: usize) {
    for _ in 0..n {
        out.push(CRYPT_B64[(v & 0x3f) as usize] as char);
        v >>= 6;
    }
}

/// MD5-crypt as Poul-Henning Kamp defined it for FreeBSD, with Apache's `$apr1$` magic or the
/// original `$1$`: 1000 rounds of MD5 over password, salt and the previous digest.
pub fn md5_crypt(password: &[u8], salt: &[u8], magic: &str) -> String {
    let salt = &salt[..salt.len().min(8)];
    let mut ctx = Md5::new();
    ctx.update(password);
    ctx.update(magic.as_bytes());
    ctx.update(salt);
    let alt = Md5::new()
        .chain_update(password)
        .chain_update(salt)
        .chain_update(password)
        .finalize();
    let mut left = password.len();
    while left > 0 {
        let n = left.min(16);
        ctx.update(&alt[..n]);
        left -= n;
    }
    let mut i = password.len();
    while i != 0 {
        if i & 1 != 0 {
            ctx.update([0u8]);
        } else {
            ctx.update(&password[..1]);
        }
        i >>= 1;
    }
    let mut fin = ctx.finalize();
    for round in 0..1000 {
        let mut c = Md5::new();
        if round & 1 != 0 {
            c.update(password);
        } else {
            c.update(fin);
        }
        if round % 3 != 0 {
            c.update(salt);
        }
        if round % 7 != 0 {
            c.update(password);
        }
        if round & 1 != 0 {
            c.update(fin);
        } else {
            c.update(password);
        }
        fin = c.finalize();
    }
    let f = |i: usize| fin[i] as u32;
    let mut out = String::with_capacity(magic.len() + salt.len() + 23);
    out.push_str(magic);
    out.push_str(&String::from_utf8_lossy(salt));
    out.push('$');
    for (a, b, c) in [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)] {
        to64(&mut out, f(a) << 16 | f(b) << 8 | f(c), 4);
    }
    to64(&mut out, f(11), 2);
    out
}

/// One user of the file.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub hash: Hash,
    /// The hash as stored, for cache keys: a changed entry never matches an old cache line.
    pub stored: String,
    pub line: usize,
}

impl User {
    fn new(name: String, hash: Hash, line: usize) -> User {
        User {
            stored: hash.stored(),
            name,
            hash,
            line,
        }
    }
}

/// Every user of one htpasswd file.
#[derive(Debug, Clone, Default)]
pub struct Htpasswd {
    users: HashMap<String, Arc<User>>,
    /// What an unknown user's password is checked against, so that an unknown name costs
    /// what a known one does.
    decoy: Option<Arc<User>>,
    /// How long one verification of the costliest scheme takes here, measured once on first
    /// use: the least time any uncached verification answers in.
    cost: Arc<std::sync::OnceLock<std::time::Duration>>,
}

/// Something worth telling the operator that does not stop the file from loading.
#[derive(Debug, Clone)]
pub struct Warning(pub String);

impl Htpasswd {
    /// Parse an htpasswd file. Comments (`#`) and blank lines are skipped; CRLF is accepted.
    pub fn parse(
        path: &Path,
        text: &str,
        allow_plaintext: bool,
    ) -> Result<(Htpasswd, Vec<Warning>), Vec<Diagnostic>> {
        let src = Source { path, text };
        let mut errors = Vec::new();
        let mut users: HashMap<String, Arc<User>> = HashMap::new();
        let mut weak: Vec<String> = Vec::new();
        let mut offset = 0;
        for (i, raw_line) in text.split('\n').enumerate() {
            let line_no = i + 1;
            let at = offset;
            offset += raw_line.len() + 1;
            let line = raw_line.strip_suffix('\r').unwrap_or(raw_line);
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((name, stored)) = line.split_once(':') else {
                errors.push(src.at(at, "expected user:hash"));
                continue;
            };
            if name.is_empty()
                || !name.bytes().all(|b| b.is_ascii_graphic() || b >= 0x80)
                || name.len() > 255
            {
                errors.push(src.at(
                    at,
                    format!(
                        "user name \"{}\" must be 1-255 printable characters without spaces",
                        name.escape_debug()
                    ),
                ));
                continue;
            }
            let hash_at = at + name.len() + 1;
            let hash = match parse_hash(stored, allow_plaintext) {
                Ok(h) => h,
                Err(e) => {
                    errors.push(src.at(hash_at, format!("user \"{name}\": {e}")));
                    continue;
                }
            };
            if let Some(first) = users.get(name) {
                errors.push(src.at(
                    at,
                    format!(
                        "user \"{name}\" appears again; first on line {}",
                        first.line
                    ),
                ));
                continue;
            }
            if hash.is_weak() {
                weak.push(format!("{name} ({})", hash.scheme()));
            }
            users.insert(
                name.to_string(),
                Arc::new(User::new(name.to_string(), hash, line_no)),
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut warnings = Vec::new();
        if !weak.is_empty() {
            weak.sort();
            warnings.push(Warning(format!(
                "{}: weak password hashes; move these users to bcrypt (`htpasswd -B`): {}",
                path.display(),
                weak.join(", ")
            )));
        }
        // The decoy follows the costliest entry, so no unknown name is cheaper than a known one.
        let decoy = users
            .values()
            .max_by_key(|u| (u.hash.is_slow(), cost_rank(&u.hash)))
            .map(|u| Arc::new(User::new(String::new(), u.hash.decoy(), 0)));
        Ok((
            Htpasswd {
                users,
                decoy,
                cost: Arc::default(),
            },
            warnings,
        ))
    }

    pub fn user(&self, name: &str) -> Option<&Arc<User>> {
        self.users.get(name)
    }

    /// The user to verify against for `name`: the real one, or the decoy for an unknown name.
    /// `None` only for an empty file.
    pub fn user_or_decoy(&self, name: &str) -> Option<(Arc<User>, bool)> {
        match self.users.get(name) {
            Some(u) => Some((u.clone(), true)),
            None => self.decoy.clone().map(|d| (d, false)),
        }
    }

    /// How long a verification of the file's costliest scheme takes, once measured.
    pub fn cost(&self) -> Option<std::time::Duration> {
        self.cost.get().copied()
    }

    /// Measure [`Htpasswd::cost`] with one verification of the decoy (blocking: it computes
    /// the costliest hash once); later calls return the first measure.
    pub fn measure_cost(&self) -> std::time::Duration {
        *self.cost.get_or_init(|| {
            let started = std::time::Instant::now();
            if let Some(decoy) = &self.decoy {
                decoy
                    .hash
                    .verify(b"portcullis: timing the costliest scheme");
            }
            started.elapsed()
        })
    }

    /// Every user, in no particular order.
    pub fn users(&self) -> impl Iterator<Item = &Arc<User>> {
        self.users.values()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn cost_rank(h: &Hash) -> u32 {
    match h {
        Hash::Bcrypt(s) => 1000 + s.get(4..6).and_then(|c| c.parse().ok()).unwrap_or(0),
        Hash::ShaCrypt(_) => 500,
        Hash::Md5Crypt { .. } => 100,
        _ => 0,
    }
}

fn parse_hash(stored: &str, allow_plaintext: bool) -> Result<Hash, String> {
    let s = stored.trim_end();
    if s.starts_with("$2") {
        return parse_bcrypt(s);
    }
    if let Some(rest) = s.strip_prefix("$apr1$") {
        return parse_md5_crypt(s, rest, "$apr1$");
    }
    if let Some(rest) = s.strip_prefix("$1$") {
        return parse_md5_crypt(s, rest, "$1$");
    }
    if s.starts_with("$5$") || s.starts_with("$6$") {
        return parse_sha_crypt(s);
    }
    if let Some(b) = s.strip_prefix("{SHA}") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|_| "{SHA} hash is not valid base64".to_string())?;
        let digest: [u8; 20] = bytes
            .try_into()
            .map_err(|_| "{SHA} hash must decode to 20 bytes".to_string())?;
        return Ok(Hash::Sha1(digest));
    }
    if let Some(b) = s.strip_prefix("{SSHA}") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|_| "{SSHA} hash is not valid base64".to_string())?;
        if bytes.len() <= 20 {
            return Err("{SSHA} hash must hold a 20-byte digest and a salt".into());
        }
        let (d, salt) = bytes.split_at(20);
        return Ok(Hash::Ssha {
            digest: d.try_into().expect("20 bytes"),
            salt: salt.to_vec(),
        });
    }
    if let Some(scheme) = s.strip_prefix('$').and_then(|r| r.split('$').next()) {
        if !scheme.is_empty() && s.len() > scheme.len() + 2 {
            return Err(format!(
                "unsupported hash format `${scheme}$`; use htpasswd -B (bcrypt), -m (apr1), or openssl passwd -5/-6"
            ));
        }
    }
    if s.len() == 13 && s.bytes().all(|b| CRYPT_B64.contains(&b)) {
        return if cfg!(feature = "des-crypt") {
            Ok(Hash::DesCrypt(s.to_string()))
        } else {
            Err("DES crypt entry, but this build has no DES support (feature `des-crypt`); re-hash with htpasswd -B".into())
        };
    }
    if allow_plaintext {
        return Ok(Hash::Plain(stored.to_string()));
    }
    Err("not a known hash format; if it is a plain-text password (htpasswd -p), set [auth] htpasswd_plaintext = true, or better re-hash it with htpasswd -B".into())
}

fn parse_bcrypt(s: &str) -> Result<Hash, String> {
    let bad = || {
        format!(
            "malformed bcrypt hash (expected $2y$NN$ and 53 characters, got {} characters)",
            s.len()
        )
    };
    let version = s.get(1..3).ok_or_else(bad)?;
    if !matches!(version, "2a" | "2b" | "2x" | "2y") {
        return Err(format!("unsupported bcrypt version ${version}$"));
    }
    let cost: u32 = s.get(4..6).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    if s.len() != 60 || s.as_bytes()[3] != b'$' || s.as_bytes()[6] != b'$' {
        return Err(bad());
    }
    if !(4..=MAX_BCRYPT_COST).contains(&cost) {
        return Err(format!(
            "bcrypt cost {cost} is outside 4..={MAX_BCRYPT_COST}"
        ));
    }
    // Parse once now, so that verification can never fail on the format.
    s.parse::<bcrypt::HashParts>().map_err(|_| bad())?;
    Ok(Hash::Bcrypt(s.to_string()))
}

fn parse_md5_crypt(full: &str, rest: &str, magic: &'static str) -> Result<Hash, String> {
    let (salt, hash) = rest
        .split_once('$')
        .ok_or_else(|| format!("malformed {magic} hash: expected {magic}SALT$HASH"))?;
    if salt.is_empty()
        || salt.len() > 8
        || hash.len() != 22
        || !hash.bytes().all(|b| CRYPT_B64.contains(&b))
    {
        return Err(format!(
            "malformed {magic} hash: the salt must be 1-8 characters and the hash 22"
        ));
    }
    Ok(Hash::Md5Crypt {
        magic,
        salt: salt.to_string(),
        full: full.to_string(),
    })
}

fn parse_sha_crypt(s: &str) -> Result<Hash, String> {
    let parsed =
        sha_crypt::PasswordHashRef::new(s).map_err(|_| "malformed SHA-crypt hash".to_string())?;
    let mut fields = parsed.fields();
    if let Some(first) = fields.next() {
        if let Some(r) = first.as_str().strip_prefix("rounds=") {
            let rounds: u32 = r
                .parse()
                .map_err(|_| "malformed SHA-crypt rounds".to_string())?;
            if rounds > MAX_SHA_CRYPT_ROUNDS {
                return Err(format!(
                    "SHA-crypt rounds {rounds} exceed {MAX_SHA_CRYPT_ROUNDS}"
                ));
            }
        }
    }
    // A verification with a wrong password tells a damaged entry from a sound one.
    use sha_crypt::PasswordVerifier;
    match sha_crypt::ShaCrypt::default().verify_password(b"\0probe", s) {
        Err(sha_crypt::password_hash::Error::PasswordInvalid) | Ok(()) => {
            Ok(Hash::ShaCrypt(s.to_string()))
        }
        Err(_) => Err("malformed SHA-crypt hash".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMATS: &str = include_str!("../../tests/fixtures/htpasswd.formats");
    const PASSWORDS: &str = include_str!("../../tests/fixtures/passwords.txt");

    fn passwords() -> Vec<(&'static str, &'static str)> {
        PASSWORDS
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .collect()
    }

    #[test]
    fn every_fixture_format_verifies_its_password_and_refuses_others() {
        let (file, warnings) = Htpasswd::parse(Path::new("f"), FORMATS, false).unwrap();
        assert_eq!(file.len(), 9);
        let mut checked = 0;
        for (user, password) in passwords() {
            let Some(u) = file.user(user) else { continue };
            assert!(
                u.hash.verify(password.as_bytes()),
                "{user} ({})",
                u.hash.scheme()
            );
            assert!(!u.hash.verify(b"wrong password"), "{user}");
            assert!(!u.hash.verify(b""), "{user}");
            checked += 1;
        }
        assert_eq!(checked, 9);
        let w = &warnings[0].0;
        assert!(
            w.contains("dave-des (des-crypt)")
                && w.contains("heidi-md5 (md5-crypt)")
                && w.contains("carol-sha (sha1)"),
            "{w}"
        );
        assert!(!w.contains("alice"), "{w}");
    }

    #[test]
    fn md5_crypt_matches_known_vectors() {
        // From `openssl passwd -1 -salt saltsalt password` and `openssl passwd -apr1 -salt saltsalt password`.
        assert_eq!(
            md5_crypt(b"password", b"saltsalt", "$1$"),
            "$1$saltsalt$qjXMvbEw8oaL.CzflDtaK/"
        );
        assert_eq!(
            md5_crypt(b"password", b"saltsalt", "$apr1$"),
            "$apr1$saltsalt$yAAkm4libquA.ZWLHbSBq/"
        );
    }

    #[test]
    fn plain_text_needs_the_explicit_switch() {
        let text = include_str!("../../tests/fixtures/htpasswd.plain");
        let err = Htpasswd::parse(Path::new("p"), text, false).unwrap_err();
        assert!(
            err[0].message.contains("htpasswd_plaintext = true"),
            "{}",
            err[0]
        );
        let (file, warnings) = Htpasswd::parse(Path::new("p"), text, true).unwrap();
        assert!(file.user("erin-plain").unwrap().hash.verify(b"plain pass"));
        assert!(warnings[0].0.contains("erin-plain (plain)"));
    }

    #[test]
    fn crlf_files_load() {
        let text = include_str!("../../tests/fixtures/htpasswd.crlf");
        assert!(text.contains("\r\n"));
        let (file, _) = Htpasswd::parse(Path::new("c"), text, false).unwrap();
        assert!(file.user("kim-crlf").unwrap().hash.verify(b"crlf pass"));
    }

    #[test]
    fn bad_entries_are_load_errors_with_their_line() {
        let text = "# comment\n\nok:$apr1$k/0eORcY$POqvuh.Eest6qgEQsSodA.\nnocolon\nx:$argon2id$v=19$m=65536$abc$def\ny:$2y$05$tooshort\nz:$2y$31$NpcbkiYwpV0ltVufqKuT8OluF3SuhC4O5uanBAf9c7U/MviQKRzLm\nok:{SHA}KvPXpIScDQubdcQXyPXUdUCmoqA=\nw:whatever\n";
        let errors = Htpasswd::parse(Path::new("h"), text, false).unwrap_err();
        let lines: Vec<String> = errors.iter().map(|d| d.to_string()).collect();
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert!(lines[0].starts_with("h:4:1: expected user:hash"));
        assert!(
            lines[1].starts_with("h:5:3: user \"x\": unsupported hash format `$argon2id$`"),
            "{lines:#?}"
        );
        assert!(lines[2].starts_with("h:6:3: user \"y\": malformed bcrypt hash"));
        assert!(lines[3].contains("bcrypt cost 31"));
        assert!(lines[4].starts_with("h:8:1: user \"ok\" appears again; first on line 3"));
        assert!(lines[5].starts_with("h:9:3: user \"w\": not a known hash format"));
    }

    #[test]
    fn decoys_cost_what_the_costliest_entry_costs_and_match_nothing() {
        let (file, _) = Htpasswd::parse(Path::new("f"), FORMATS, false).unwrap();
        let (decoy, known) = file.user_or_decoy("nobody").unwrap();
        assert!(!known);
        let Hash::Bcrypt(h) = &decoy.hash else {
            panic!("{:?}", decoy.hash)
        };
        assert!(h.starts_with("$2y$05$"), "{h}");
        for (_, password) in passwords() {
            assert!(!decoy.hash.verify(password.as_bytes()));
        }
    }

    #[test]
    fn sha_crypt_decoys_are_well_formed() {
        for stored in ["$5$rounds=6000$abcdefgh$", "$6$abcdefgh$"] {
            // Only the scheme and rounds of the template matter.
            let template = Hash::ShaCrypt(stored.to_string());
            let Hash::ShaCrypt(d) = template.decoy() else {
                panic!()
            };
            assert!(parse_sha_crypt(&d).is_ok(), "{d}");
        }
    }
}
