//! Label selectors for `nodeSelector` and `ownerSelector`, a small subset of Calico's syntax:
//! `all()`, `has(key)`, `!has(key)`, `key == "value"`, `key != "value"`,
//! `key in {"a", "b"}`, joined by `&&`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A parsed label expression. Serialised as its source text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    source: String,
    terms: Vec<Term>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    All,
    Has(String),
    NotHas(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
}

/// Why a selector did not parse; `at` is a byte offset into the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {source_text:?} at byte {at}: {reason}")]
pub struct SelectorError {
    pub source_text: String,
    pub at: usize,
    pub reason: &'static str,
}

impl Selector {
    /// The selector that matches everything (`all()`).
    pub fn all() -> Self {
        Selector {
            source: "all()".into(),
            terms: vec![Term::All],
        }
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::All => true,
            Term::Has(k) => labels.contains_key(k),
            Term::NotHas(k) => !labels.contains_key(k),
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::NotEq(k, v) => labels.get(k) != Some(v),
            Term::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl Default for Selector {
    fn default() -> Self {
        Selector::all()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.source
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(source: &str) -> Result<Self, Self::Err> {
        let mut p = Parser {
            src: source,
            pos: 0,
        };
        let mut terms = Vec::new();
        p.skip_ws();
        if p.at_end() {
            // An empty selector selects everything, as in Calico.
            return Ok(Selector::all());
        }
        loop {
            terms.push(p.term()?);
            p.skip_ws();
            if p.at_end() {
                break;
            }
            p.expect("&&")?;
        }
        Ok(Selector {
            source: source.to_string(),
            terms,
        })
    }
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, reason: &'static str) -> SelectorError {
        SelectorError {
            source_text: self.src.to_string(),
            at: self.pos,
            reason,
        }
    }
    fn rest(&self) -> &str {
        &self.src[self.pos..]
    }
    fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }
    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.src.len() - trimmed.len();
    }
    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, token: &'static str) -> Result<(), SelectorError> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(self.err(match token {
                "&&" => "expected `&&` between terms",
                ")" => "expected `)`",
                "(" => "expected `(`",
                "{" => "expected `{`",
                _ => "unexpected token",
            }))
        }
    }
    fn ident(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let len = self
            .rest()
            .find(|c: char| !(c.is_ascii_alphanumeric() || "-_./".contains(c)))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.err("expected a label key"));
        }
        let id = self.rest()[..len].to_string();
        self.pos += len;
        Ok(id)
    }
    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let quote = match self.rest().chars().next() {
            Some(q @ ('"' | '\'')) => q,
            _ => return Err(self.err("expected a quoted value")),
        };
        self.pos += 1;
        let end = self
            .rest()
            .find(quote)
            .ok_or_else(|| self.err("unterminated string"))?;
        let s = self.rest()[..end].to_string();
        self.pos += end + 1;
        Ok(s)
    }
    fn term(&mut self) -> Result<Term, SelectorError> {
        if self.eat("all()") {
            return Ok(Term::All);
        }
        let negated = self.eat("!");
        if self.eat("has") {
            self.expect("(")?;
            let k = self.ident()?;
            self.expect(")")?;
            return Ok(if negated {
                Term::NotHas(k)
            } else {
                Term::Has(k)
            });
        }
        if negated {
            return Err(self.err("`!` must be followed by has(...)"));
        }
        let key = self.ident()?;
        if self.eat("==") {
            Ok(Term::Eq(key, self.string()?))
        } else if self.eat("!=") {
            Ok(Term::NotEq(key, self.string()?))
        } else if self.eat("in") {
            self.expect("{")?;
            let mut values = vec![self.string()?];
            while self.eat(",") {
                values.push(self.string()?);
            }
            if !self.eat("}") {
                return Err(self.err("expected `}`"));
            }
            Ok(Term::In(key, values))
        } else {
            Err(self.err("expected `==`, `!=` or `in` after the key"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_table() {
        let l = labels(&[("zone", "a"), ("app", "web")]);
        let cases = [
            ("all()", true),
            ("", true),
            ("has(zone)", true),
            ("!has(zone)", false),
            ("zone == \"a\"", true),
            ("zone == 'b'", false),
            ("zone != \"b\" && app == \"web\"", true),
            ("app in {\"db\", \"web\"}", true),
            ("app in {\"db\"}", false),
            ("has(missing)", false),
        ];
        for (src, want) in cases {
            let s: Selector = src.parse().expect(src);
            assert_eq!(s.matches(&l), want, "{src}");
        }
    }

    #[test]
    fn bad_selectors_name_the_position() {
        let e = "zone = \"a\"".parse::<Selector>().unwrap_err();
        assert_eq!(e.at, 5);
        assert!("has(zone".parse::<Selector>().is_err());
        assert!("zone == \"a".parse::<Selector>().is_err());
        assert!("zone == \"a\" app".parse::<Selector>().is_err());
    }
}
