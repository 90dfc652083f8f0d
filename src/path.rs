//! Request path normalisation (DESIGN.md §5).
//!
//! Authorization and `public_paths` are decided on the path returned here, and it is also the
//! path forwarded, so the backend can never be shown a path other than the one that was checked.
//! Unambiguous spellings are normalised (`%41` → `A`, `/./`, `//`, `a/../`, RFC 3986 §5.2.4);
//! spellings that backends disagree about are refused with 400: an encoded `/` or `\`, a literal
//! backslash, a `..` above the root, control characters, invalid or overlong UTF-8 in escapes,
//! and `..;`-style segments that some servlet containers treat as `..`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    NotOrigin,
    BadEscape,
    EncodedSeparator,
    Backslash,
    ControlChar,
    InvalidUtf8,
    AboveRoot,
    DotWithParams,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotOrigin => "path does not start with '/'",
            PathError::BadEscape => "malformed percent-escape",
            PathError::EncodedSeparator => "encoded '/' or '\\' in path",
            PathError::Backslash => "backslash in path",
            PathError::ControlChar => "control character in path",
            PathError::InvalidUtf8 => "escapes are not valid UTF-8",
            PathError::AboveRoot => "'..' above the root",
            PathError::DotWithParams => "dot segment with ';' parameters",
        })
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Canonical spelling of one segment: unreserved escapes decoded, other escapes upper-cased.
fn canonical_segment(seg: &str, out: &mut String) -> Result<(), PathError> {
    let bytes = seg.as_bytes();
    let mut decoded = Vec::new(); // every byte the segment stands for, to check UTF-8
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let v = h << 4 | l;
            match v {
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                0..=0x1f | 0x7f => return Err(PathError::ControlChar),
                _ => {}
            }
            decoded.push(v);
            if is_unreserved(v) {
                out.push(v as char);
            } else {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[(v >> 4) as usize]));
                out.push(char::from(b"0123456789ABCDEF"[(v & 15) as usize]));
            }
            i += 3;
        } else {
            match b {
                b'\\' => return Err(PathError::Backslash),
                0..=0x1f | 0x7f => return Err(PathError::ControlChar),
                _ => {}
            }
            decoded.push(b);
            out.push(b as char);
            i += 1;
        }
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::InvalidUtf8);
    }
    Ok(())
}

/// Normalise an origin-form path (no query). See the module comment for what is refused.
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOrigin);
    }
    if !path.is_ascii() {
        return Err(PathError::InvalidUtf8);
    }
    // Most paths have nothing to normalise: no escapes, no empty or dot segments.
    let plain = path
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\')
        && !path.contains("//")
        && !path.contains("/.");
    if plain {
        return Ok(path.to_owned());
    }
    let mut segments: Vec<String> = Vec::new();
    let mut trailing_slash = false;
    for raw in path[1..].split('/') {
        let mut seg = String::with_capacity(raw.len());
        canonical_segment(raw, &mut seg)?;
        trailing_slash = false;
        match seg.as_str() {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = true;
            }
            s => {
                let before_params = s.split(';').next().unwrap_or(s);
                if before_params == "." || before_params == ".." {
                    return Err(PathError::DotWithParams);
                }
                segments.push(seg);
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_paths_are_unchanged() {
        for p in [
            "/",
            "/api/v1/invoke",
            "/mcp",
            "/api/",
            "/a%20b",
            "/caf%C3%A9",
            "/a;b=c",
        ] {
            assert_eq!(normalize(p).as_deref(), Ok(p));
        }
    }

    #[test]
    fn ambiguous_spellings_are_normalised() {
        assert_eq!(normalize("/api/../admin").unwrap(), "/admin");
        assert_eq!(normalize("/api/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(normalize("/api/%2E%2E/admin").unwrap(), "/admin");
        assert_eq!(normalize("//admin").unwrap(), "/admin");
        assert_eq!(normalize("/api//v1///invoke").unwrap(), "/api/v1/invoke");
        assert_eq!(normalize("/./api/./x").unwrap(), "/api/x");
        assert_eq!(normalize("/api/v1/..").unwrap(), "/api/");
        assert_eq!(normalize("/%61pi").unwrap(), "/api");
        assert_eq!(normalize("/a%3fb").unwrap(), "/a%3Fb");
    }

    #[test]
    fn dangerous_spellings_are_refused() {
        assert_eq!(
            normalize("/api%2F..%2Fadmin"),
            Err(PathError::EncodedSeparator)
        );
        assert_eq!(normalize("/api%2fadmin"), Err(PathError::EncodedSeparator));
        assert_eq!(
            normalize("/api%5c..%5cadmin"),
            Err(PathError::EncodedSeparator)
        );
        assert_eq!(normalize("/api\\..\\admin"), Err(PathError::Backslash));
        assert_eq!(normalize("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize("/a/../../etc"), Err(PathError::AboveRoot));
        assert_eq!(normalize("/a/..;/admin"), Err(PathError::DotWithParams));
        assert_eq!(normalize("/a%00"), Err(PathError::ControlChar));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(
            normalize("/%c0%ae%c0%ae/admin"),
            Err(PathError::InvalidUtf8)
        );
        assert_eq!(normalize("*"), Err(PathError::NotOrigin));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Segments built from the pieces path tricks are made of.
    fn segment() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just("."),
                Just(".."),
                Just("%2e"),
                Just("%2E%2e"),
                Just("%2f"),
                Just("%5c"),
                Just("\\"),
                Just(";"),
                Just("..;"),
                Just("%00"),
                Just("%c0%ae"),
                Just("api"),
                Just("admin"),
                Just("x"),
                Just("%41"),
                Just("é"),
                Just(""),
            ],
            0..4,
        )
        .prop_map(|parts| parts.concat())
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 0..8).prop_map(|segs| format!("/{}", segs.join("/")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whatever comes in, what comes out is canonical: normalising again changes nothing,
        /// no segment is `.` or `..` (decoded), nothing is empty, and nothing encodes a separator.
        #[test]
        fn a_normalised_path_is_canonical(p in path()) {
            if let Ok(n) = normalize(&p) {
                prop_assert_eq!(normalize(&n), Ok(n.clone()));
                prop_assert!(n.starts_with('/'));
                for seg in n.split('/').skip(1) {
                    prop_assert!(seg != "." && seg != "..", "{} from {}", n, p);
                }
                prop_assert!(!n.contains("//") || n == "/", "{} from {}", n, p);
                let lower = n.to_ascii_lowercase();
                prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !n.contains('\\'));
            }
        }

        /// A prefix rule judges the normalised path, so a path that passes `/api/*` really is
        /// under `/api/`: no spelling smuggles `/admin` past it.
        #[test]
        fn nothing_escapes_the_prefix_an_allow_rule_checks(suffix in path()) {
            let p = format!("/api{suffix}");
            if let Ok(n) = normalize(&p) {
                if let Some(rest) = n.strip_prefix("/api/") {
                    let under: Vec<&str> = rest.split('/').collect();
                    prop_assert!(!under.contains(&".."), "{} from {}", n, p);
                }
                let rule = crate::authz::Rule::parse("GET /api/*").unwrap();
                if crate::authz::is_allowed(Some(std::slice::from_ref(&rule)), &http::Method::GET, &n) {
                    prop_assert!(n.starts_with("/api/") || n == "/api", "{} allowed from {}", n, p);
                }
            }
        }
    }
}
