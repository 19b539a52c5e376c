//! Distinguished names (RFC 4514), one implementation for the relay, the
//! configuration and the sync: RDNs split on unescaped commas, attribute
//! value assertions on unescaped plus signs, escapes (`\,` and `\2C`)
//! decoded, and comparison without case, as directories compare the usual
//! naming attributes.

/// The RDNs of `dn` as written, first (leftmost) first. Commas escaped with
/// a backslash, in either form, do not split.
fn split_rdns(dn: &str) -> Vec<&str> {
    split_unescaped(dn, ',')
}

/// `text` split on each `separator` that no backslash escapes.
fn split_unescaped(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            c if c == separator && !escaped => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => escaped = false,
        }
    }
    parts.push(&text[start..]);
    parts
}

/// An attribute value with its escapes decoded: `\,` → `,`, `\2C` → `,`.
fn unescape(value: &str) -> String {
    let mut bytes = Vec::with_capacity(value.len());
    let raw = value.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && i + 1 < raw.len() {
            // Two hex digits exactly (from_str_radix alone would take "+5").
            let hex = raw
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(byte) => {
                    bytes.push(byte);
                    i += 3;
                }
                None => {
                    bytes.push(raw[i + 1]);
                    i += 2;
                }
            }
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `value` without its trailing spaces, but for one escaped by an odd
/// number of backslashes (`a\\ ` keeps its space; `a\\\\ ` does not).
fn keep_escaped_trailing_space(value: &str) -> &str {
    let trimmed = value.trim_end();
    if trimmed.len() == value.len() {
        return value;
    }
    let backslashes = trimmed.bytes().rev().take_while(|b| *b == b'\\').count();
    if backslashes % 2 == 1 {
        &value[..trimmed.len() + 1]
    } else {
        trimmed
    }
}

/// One RDN for comparison: its (attribute, value) pairs lowercased, values
/// decoded, sorted (a multi-valued RDN's order does not matter).
fn canonical_rdn(rdn: &str) -> Option<Vec<(String, String)>> {
    let mut avas = Vec::new();
    for ava in split_unescaped(rdn, '+') {
        let (attr, value) = ava.split_once('=')?;
        let attr = attr.trim();
        let valid_attr = attr.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && attr.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        // Spaces around the value are not part of it, unless escaped.
        let value = value.trim_start();
        let value = keep_escaped_trailing_space(value);
        if !valid_attr || value.is_empty() {
            return None;
        }
        avas.push((attr.to_lowercase(), unescape(value).to_lowercase()));
    }
    avas.sort();
    Some(avas)
}

/// The DN as a list of canonical RDNs; `None` if it is not a DN.
fn canonical(dn: &str) -> Option<Vec<Vec<(String, String)>>> {
    if dn.trim().is_empty() {
        return Some(Vec::new());
    }
    split_rdns(dn).into_iter().map(canonical_rdn).collect()
}

/// Whether `dn` has the shape of a DN (the empty root DSE name excluded).
pub fn is_valid(dn: &str) -> bool {
    !dn.trim().is_empty() && canonical(dn).is_some()
}

/// Whether two DNs name the same entry (spaces, case and escapes aside).
pub fn same(a: &str, b: &str) -> bool {
    matches!((canonical(a), canonical(b)), (Some(a), Some(b)) if a == b)
}

/// A key for maps of DNs: equal for DNs that are [`same`].
pub fn key(dn: &str) -> String {
    match canonical(dn) {
        Some(rdns) => rdns
            .iter()
            .map(|rdn| {
                rdn.iter()
                    .map(|(attr, value)| format!("{attr}={}", ldap3::dn_escape(value)))
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .collect::<Vec<_>>()
            .join(","),
        None => dn.to_lowercase(),
    }
}

/// Whether `dn` is `base` or below it.
pub fn is_within(dn: &str, base: &str) -> bool {
    match (canonical(dn), canonical(base)) {
        (Some(dn), Some(base)) => dn.len() >= base.len() && dn[dn.len() - base.len()..] == base[..],
        _ => false,
    }
}

/// The DN without its first RDN, as written; empty for a one-RDN DN.
pub fn parent(dn: &str) -> &str {
    let first = split_rdns(dn)[0];
    dn.get(first.len() + 1..).map_or("", str::trim_start)
}

/// `rdn,parent`, or `rdn` under the root.
pub fn with_rdn(rdn: &str, parent: &str) -> String {
    if parent.is_empty() {
        rdn.to_owned()
    } else {
        format!("{rdn},{parent}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_keep_escaped_commas_in_the_first_rdn() {
        let cases = [
            ("uid=a,ou=people,dc=x", "ou=people,dc=x"),
            ("uid=smith\\,j,ou=people,dc=x", "ou=people,dc=x"),
            ("uid=smith\\2Cj,ou=people,dc=x", "ou=people,dc=x"),
            ("cn=a\\\\,dc=x", "dc=x"),
            ("cn=a+sn=b,dc=x", "dc=x"),
            ("dc=x", ""),
            ("uid=a, ou=people", "ou=people"),
        ];
        for (dn, expected) in cases {
            assert_eq!(parent(dn), expected, "{dn}");
        }
        assert_eq!(with_rdn("uid=b", parent("uid=smith\\,j,dc=x")), "uid=b,dc=x");
    }

    #[test]
    fn dns_compare_without_case_spaces_or_escape_forms() {
        let same_cases = [
            ("uid=A,ou=People,dc=X", "uid=a,ou=people,dc=x"),
            ("uid=a, ou=people , dc=x", "uid=a,ou=people,dc=x"),
            ("uid=smith\\,j,dc=x", "uid=smith\\2Cj,dc=x"),
            ("cn=a+sn=b,dc=x", "sn=b+cn=a,dc=x"),
        ];
        for (a, b) in same_cases {
            assert!(same(a, b), "{a} = {b}");
            assert_eq!(key(a), key(b), "{a} = {b}");
        }
        assert!(!same("uid=smith\\,j,dc=x", "uid=smith,j=,dc=x"));
        assert!(
            same("cn=a\\+5,dc=x", "cn=a\\2B5,dc=x"),
            "an escaped plus, not a hex byte"
        );
        assert!(same("cn=a\\ ,dc=x", "cn=a\\20,dc=x"), "an escaped trailing space stays");
        assert!(
            same("cn=a\\\\ ,dc=x", "cn=a\\\\,dc=x"),
            "after an escaped backslash a space is not escaped"
        );
        assert!(!same("uid=a,dc=x", "uid=b,dc=x"));
    }

    #[test]
    fn within_is_by_whole_rdns() {
        let cases = [
            (
                "uid=a,ou=People, dc=example,dc=com",
                "ou=people,dc=example,dc=com",
                true,
            ),
            ("dc=example,dc=com", "dc=example,dc=com", true),
            ("ou=people,dc=example,dc=com", "ou=staff,dc=example,dc=com", false),
            ("dc=xexample,dc=com", "dc=example,dc=com", false),
            // A comma inside a value is not a boundary.
            ("uid=x,ou=a\\,b,dc=example,dc=com", "dc=example,dc=com", true),
            ("uid=x,ou=a\\,dc=example,dc=com", "dc=example,dc=com", false),
            ("uid=x\\,dc=example,dc=com", "dc=example,dc=com", false),
            ("dc=com", "dc=example,dc=com", false),
        ];
        for (dn, base, within) in cases {
            assert_eq!(is_within(dn, base), within, "{dn} within {base}");
        }
    }

    #[test]
    fn valid_dns() {
        for dn in ["cn=a\\,b,dc=x", "cn=a+sn=b,dc=x", "2.5.4.3=x", "cn=\\ lead"] {
            assert!(is_valid(dn), "{dn}");
        }
        for dn in ["people", "cn=,dc=x", "", "cn=a,,dc=x", "=a", "c n=a"] {
            assert!(!is_valid(dn), "{dn}");
        }
    }
}
