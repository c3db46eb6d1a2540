//! Message filters, RocketMQ's `FilterExpression`: TAG (`*`, or `a || b`) and SQL92 over a
//! message's user properties. The broker applies them, so a message a filter refuses is never
//! leased; the proxy parses them too, to refuse a bad expression before it reaches a broker.
//!
//! The SQL92 subset is RocketMQ's: `=`, `<>`, `>`, `>=`, `<`, `<=`, `[NOT] BETWEEN a AND b`,
//! `[NOT] IN ('x', ...)`, `IS [NOT] NULL`, `[NOT] CONTAINS | STARTSWITH | ENDSWITH 'x'`, `AND`,
//! `OR`, `NOT`, parentheses; string literals in single quotes (`''` escapes a quote), integers
//! (an `L` suffix is allowed), decimals, `TRUE`, `FALSE`, `NULL`. Keywords are case-insensitive;
//! property names are not. `TAGS` names the message tag unless a user property has that name.
//!
//! Where Sluice differs from RocketMQ, it is on the side of saying what it does:
//! - the whole text must parse (RocketMQ ignores trailing text, so `a = 1 junk` meant `a = 1`);
//! - `NOT` is the logical operator of standard SQL: `NOT a = 'x'` is `NOT (a = 'x')`;
//! - a property that does not read as the number it is compared with makes that comparison
//!   unknown (RocketMQ threw, dropping the message even when another `OR` branch matched).
//!
//! Logic is three-valued: a missing property is NULL, a comparison with NULL is unknown, and a
//! message matches only when the whole expression is TRUE.

use super::record::{tag_hash, RecordView};

/// Longest filter expression accepted, in bytes.
pub const FILTER_EXPRESSION_MAX_BYTES: usize = 4096;
/// Deepest nesting of parentheses and operators, so parsing and evaluation stay bounded.
pub const FILTER_DEPTH_MAX: usize = 64;
/// Most tags in one TAG expression.
pub const FILTER_TAGS_MAX: usize = 64;

pub const KIND_ALL: u8 = 0;
pub const KIND_TAG: u8 = 1;
pub const KIND_SQL: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter expression {expression:?}: {reason}")]
pub struct FilterError {
    pub expression: String,
    pub reason: String,
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    All,
    Tags { tags: Vec<String>, hashes: Vec<u32> },
    Sql(Expr),
}

impl Filter {
    pub fn parse(kind: u8, expression: &str) -> Result<Filter, FilterError> {
        let fail = |reason: String| FilterError { expression: expression.chars().take(200).collect(), reason };
        if expression.len() > FILTER_EXPRESSION_MAX_BYTES {
            return Err(fail(format!("longer than {FILTER_EXPRESSION_MAX_BYTES} bytes")));
        }
        match kind {
            KIND_ALL => Ok(Filter::All),
            KIND_TAG => parse_tags(expression).map_err(fail),
            KIND_SQL => {
                if expression.trim().is_empty() {
                    return Err(fail("an SQL92 filter needs an expression".into()));
                }
                Ok(Filter::Sql(Parser::parse(expression).map_err(fail)?))
            }
            other => Err(fail(format!("filter type {other} is not TAG (1) or SQL (2)"))),
        }
    }

    /// Whether an entry with this tag hash may pass; false means it certainly does not.
    pub fn may_pass(&self, tag_hash: u32) -> bool {
        match self {
            Filter::Tags { hashes, .. } => hashes.contains(&tag_hash),
            Filter::All | Filter::Sql(_) => true,
        }
    }

    /// True when deciding needs the record itself (its properties, or its tag to rule out a
    /// hash collision).
    pub fn needs_record(&self) -> bool {
        !matches!(self, Filter::All)
    }

    pub fn matches(&self, record: &RecordView<'_>) -> bool {
        match self {
            Filter::All => true,
            Filter::Tags { tags, .. } => tags.iter().any(|t| t == record.tag),
            Filter::Sql(expr) => expr.eval(record) == Some(Value::Bool(true)),
        }
    }
}

fn parse_tags(expression: &str) -> Result<Filter, String> {
    let text = expression.trim();
    if text.is_empty() || text == "*" {
        return Ok(Filter::All);
    }
    let tags: Vec<String> = text.split("||").map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
    if tags.is_empty() {
        return Err("no tag between the '||'".into());
    }
    if tags.len() > FILTER_TAGS_MAX {
        return Err(format!("at most {FILTER_TAGS_MAX} tags"));
    }
    let hashes = tags.iter().map(|t| tag_hash(t)).collect();
    Ok(Filter::Tags { tags, hashes })
}

/// A parsed SQL92 expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Value),
    Property(String),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    IsNull { expr: Box<Expr>, negated: bool },
    Between { expr: Box<Expr>, low: Box<Expr>, high: Box<Expr>, negated: bool },
    In { expr: Box<Expr>, list: Vec<String>, negated: bool },
    Text { op: TextOp, expr: Box<Expr>, pattern: String, negated: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextOp {
    Contains,
    StartsWith,
    EndsWith,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Expr {
    /// `None` is SQL's unknown (NULL).
    fn eval(&self, record: &RecordView<'_>) -> Option<Value> {
        match self {
            Expr::Literal(v) => Some(v.clone()),
            Expr::Property(name) => property(record, name).map(|v| Value::Str(v.to_string())),
            Expr::Not(e) => match e.eval(record)? {
                Value::Bool(b) => Some(Value::Bool(!b)),
                _ => None,
            },
            Expr::Neg(e) => match e.eval(record)? {
                Value::Int(i) => i.checked_neg().map(Value::Int),
                Value::Float(f) => Some(Value::Float(-f)),
                Value::Str(s) => number(&s).map(|n| n.negate()),
                Value::Bool(_) => None,
            },
            Expr::And(a, b) => match (truth(a.eval(record)), truth(b.eval(record))) {
                (Some(false), _) | (_, Some(false)) => Some(Value::Bool(false)),
                (Some(true), Some(true)) => Some(Value::Bool(true)),
                _ => None,
            },
            Expr::Or(a, b) => match (truth(a.eval(record)), truth(b.eval(record))) {
                (Some(true), _) | (_, Some(true)) => Some(Value::Bool(true)),
                (Some(false), Some(false)) => Some(Value::Bool(false)),
                _ => None,
            },
            Expr::Compare(op, a, b) => compare(*op, &a.eval(record)?, &b.eval(record)?).map(Value::Bool),
            Expr::IsNull { expr, negated } => Some(Value::Bool(expr.eval(record).is_none() != *negated)),
            Expr::Between { expr, low, high, negated } => {
                let v = expr.eval(record)?;
                let ge = compare(CmpOp::Ge, &v, &low.eval(record)?)?;
                let le = compare(CmpOp::Le, &v, &high.eval(record)?)?;
                Some(Value::Bool((ge && le) != *negated))
            }
            Expr::In { expr, list, negated } => match expr.eval(record)? {
                Value::Str(s) => Some(Value::Bool(list.contains(&s) != *negated)),
                _ => None,
            },
            Expr::Text { op, expr, pattern, negated } => match expr.eval(record)? {
                Value::Str(s) => {
                    let hit = match op {
                        TextOp::Contains => s.contains(pattern.as_str()),
                        TextOp::StartsWith => s.starts_with(pattern.as_str()),
                        TextOp::EndsWith => s.ends_with(pattern.as_str()),
                    };
                    Some(Value::Bool(hit != *negated))
                }
                _ => None,
            },
        }
    }
}

fn property<'a>(record: &RecordView<'a>, name: &str) -> Option<&'a str> {
    match record.attributes.user_property(name) {
        Some(v) => Some(v),
        None if name == "TAGS" && !record.tag.is_empty() => Some(record.tag),
        None => None,
    }
}

fn truth(v: Option<Value>) -> Option<bool> {
    match v {
        Some(Value::Bool(b)) => Some(b),
        _ => None,
    }
}

/// A number read from property text (properties are strings).
#[derive(Debug, Clone, Copy)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    fn negate(self) -> Value {
        match self {
            Number::Int(i) => i.checked_neg().map_or(Value::Float(-(i as f64)), Value::Int),
            Number::Float(f) => Value::Float(-f),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }
}

fn number(text: &str) -> Option<Number> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Number::Int(i));
    }
    text.parse::<f64>().ok().filter(|f| f.is_finite()).map(Number::Float)
}

fn as_number(v: &Value) -> Option<Number> {
    match v {
        Value::Int(i) => Some(Number::Int(*i)),
        Value::Float(f) => Some(Number::Float(*f)),
        Value::Str(s) => number(s),
        Value::Bool(_) => None,
    }
}

fn compare(op: CmpOp, a: &Value, b: &Value) -> Option<bool> {
    use std::cmp::Ordering;
    let ordering = match (a, b) {
        (Value::Str(x), Value::Str(y)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Bool(x), Value::Str(s)) | (Value::Str(s), Value::Bool(x)) => {
            let parsed = match s.to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => return None,
            };
            x.cmp(&parsed)
        }
        _ => match (as_number(a)?, as_number(b)?) {
            (Number::Int(x), Number::Int(y)) => x.cmp(&y),
            (x, y) => x.as_f64().partial_cmp(&y.as_f64())?,
        },
    };
    Some(match op {
        CmpOp::Eq => ordering == Ordering::Equal,
        CmpOp::Ne => ordering != Ordering::Equal,
        CmpOp::Lt => ordering == Ordering::Less,
        CmpOp::Le => ordering != Ordering::Greater,
        CmpOp::Gt => ordering == Ordering::Greater,
        CmpOp::Ge => ordering != Ordering::Less,
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Keyword(&'static str),
    Str(String),
    Int(i64),
    Float(f64),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

const KEYWORDS: [&str; 13] =
    ["NOT", "AND", "OR", "BETWEEN", "IN", "TRUE", "FALSE", "NULL", "IS", "CONTAINS", "STARTSWITH", "ENDSWITH", "LIKE"];

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\r' | '\n' => i += 1,
            '(' | ')' | ',' | '=' | '+' | '-' => {
                out.push(match c {
                    '(' => Token::LParen,
                    ')' => Token::RParen,
                    ',' => Token::Comma,
                    '=' => Token::Op("="),
                    '+' => Token::Op("+"),
                    _ => Token::Op("-"),
                });
                i += 1;
            }
            '<' | '>' => {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                let op = match two.as_str() {
                    "<>" => "<>",
                    "<=" => "<=",
                    ">=" => ">=",
                    _ if c == '<' => "<",
                    _ => ">",
                };
                out.push(Token::Op(op));
                i += op.len();
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("a string literal is not closed with '".into()),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            s.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(ch) => {
                            s.push(*ch);
                            i += 1;
                        }
                    }
                }
                out.push(Token::Str(s));
            }
            '0'..='9' | '.' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    // An exponent's sign belongs to the number: 5E-3.
                    if (chars[i] == 'e' || chars[i] == 'E') && matches!(chars.get(i + 1), Some('+' | '-')) {
                        i += 1;
                    }
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                out.push(number_token(&text)?);
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == '$' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '$') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                match KEYWORDS.iter().find(|k| k.eq_ignore_ascii_case(&word)) {
                    Some(k) => out.push(Token::Keyword(k)),
                    None => out.push(Token::Ident(word)),
                }
            }
            '"' => return Err("strings take single quotes ('text'), not double quotes".into()),
            other => return Err(format!("unexpected character {other:?}")),
        }
    }
    Ok(out)
}

fn number_token(text: &str) -> Result<Token, String> {
    let bad = || format!("{text:?} is not a number");
    let integer = text.strip_suffix(['L', 'l']).unwrap_or(text);
    if integer.bytes().all(|b| b.is_ascii_digit()) {
        return integer.parse().map(Token::Int).map_err(|_| bad());
    }
    if text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')) {
        return text.parse::<f64>().ok().filter(|f| f.is_finite()).map(Token::Float).ok_or_else(bad);
    }
    Err(bad())
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn parse(text: &str) -> Result<Expr, String> {
        let mut p = Parser { tokens: tokenize(text)?, at: 0, depth: 0 };
        let expr = p.or()?;
        match p.peek() {
            None => Ok(expr),
            Some(t) => Err(format!("unexpected {} after a complete expression", describe(t))),
        }
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn eat_keyword(&mut self, k: &str) -> bool {
        if self.peek() == Some(&Token::Keyword(KEYWORDS.iter().find(|w| **w == k).expect("a known keyword"))) {
            self.at += 1;
            return true;
        }
        false
    }

    fn expect_keyword(&mut self, k: &str) -> Result<(), String> {
        if self.eat_keyword(k) {
            Ok(())
        } else {
            Err(format!("expected {k}, found {}", self.peek().map_or("the end".into(), describe)))
        }
    }

    fn nested<T>(&mut self, f: impl FnOnce(&mut Parser) -> Result<T, String>) -> Result<T, String> {
        self.depth += 1;
        if self.depth > FILTER_DEPTH_MAX {
            return Err(format!("nested deeper than {FILTER_DEPTH_MAX} levels"));
        }
        let out = f(self);
        self.depth -= 1;
        out
    }

    fn or(&mut self) -> Result<Expr, String> {
        self.nested(|p| {
            let mut left = p.and()?;
            while p.eat_keyword("OR") {
                left = Expr::Or(Box::new(left), Box::new(p.and()?));
            }
            Ok(left)
        })
    }

    fn and(&mut self) -> Result<Expr, String> {
        self.nested(|p| {
            let mut left = p.not()?;
            while p.eat_keyword("AND") {
                left = Expr::And(Box::new(left), Box::new(p.not()?));
            }
            Ok(left)
        })
    }

    fn not(&mut self) -> Result<Expr, String> {
        self.nested(|p| if p.eat_keyword("NOT") { Ok(Expr::Not(Box::new(p.not()?))) } else { p.predicate() })
    }

    fn predicate(&mut self) -> Result<Expr, String> {
        let left = self.unary()?;
        if self.eat_keyword("IS") {
            let negated = self.eat_keyword("NOT");
            self.expect_keyword("NULL")?;
            return Ok(Expr::IsNull { expr: Box::new(left), negated });
        }
        let negated = self.eat_keyword("NOT");
        if self.eat_keyword("BETWEEN") {
            let low = self.unary()?;
            self.expect_keyword("AND")?;
            let high = self.unary()?;
            for bound in [&low, &high] {
                if matches!(bound, Expr::Literal(Value::Str(_) | Value::Bool(_))) {
                    return Err("BETWEEN takes numbers".into());
                }
            }
            return Ok(Expr::Between { expr: Box::new(left), low: Box::new(low), high: Box::new(high), negated });
        }
        if self.eat_keyword("IN") {
            return self.in_list(left, negated);
        }
        for (word, op) in
            [("CONTAINS", TextOp::Contains), ("STARTSWITH", TextOp::StartsWith), ("ENDSWITH", TextOp::EndsWith)]
        {
            if self.eat_keyword(word) {
                let Some(Token::Str(pattern)) = self.next() else {
                    return Err(format!("{word} takes a string literal"));
                };
                return Ok(Expr::Text { op, expr: Box::new(left), pattern, negated });
            }
        }
        if self.eat_keyword("LIKE") {
            return Err("LIKE is not supported; use CONTAINS, STARTSWITH or ENDSWITH".into());
        }
        if negated {
            return Err("NOT here must be followed by BETWEEN, IN, CONTAINS, STARTSWITH or ENDSWITH".into());
        }
        let op = match self.peek() {
            Some(Token::Op("=")) => CmpOp::Eq,
            Some(Token::Op("<>")) => CmpOp::Ne,
            Some(Token::Op("<")) => CmpOp::Lt,
            Some(Token::Op("<=")) => CmpOp::Le,
            Some(Token::Op(">")) => CmpOp::Gt,
            Some(Token::Op(">=")) => CmpOp::Ge,
            _ => return Ok(left),
        };
        self.at += 1;
        let right = self.unary()?;
        if matches!(right, Expr::Literal(Value::Str(_) | Value::Bool(_))) && !matches!(op, CmpOp::Eq | CmpOp::Ne) {
            return Err("<, <=, > and >= compare numbers, not strings or booleans".into());
        }
        Ok(Expr::Compare(op, Box::new(left), Box::new(right)))
    }

    fn in_list(&mut self, left: Expr, negated: bool) -> Result<Expr, String> {
        if !matches!(left, Expr::Property(_)) {
            return Err("IN applies to a property".into());
        }
        if self.next() != Some(Token::LParen) {
            return Err("IN needs a list in parentheses".into());
        }
        let mut list = Vec::new();
        loop {
            match self.next() {
                Some(Token::Str(s)) => list.push(s),
                _ => return Err("IN lists hold string literals".into()),
            }
            match self.next() {
                Some(Token::Comma) => continue,
                Some(Token::RParen) => break,
                _ => return Err("IN list items are separated by ',' and closed by ')'".into()),
            }
        }
        Ok(Expr::In { expr: Box::new(left), list, negated })
    }

    fn unary(&mut self) -> Result<Expr, String> {
        self.nested(|p| match p.peek() {
            Some(Token::Op("-")) => {
                p.at += 1;
                Ok(match p.unary()? {
                    Expr::Literal(Value::Int(i)) => Expr::Literal(Value::Int(-i)),
                    Expr::Literal(Value::Float(f)) => Expr::Literal(Value::Float(-f)),
                    other => Expr::Neg(Box::new(other)),
                })
            }
            Some(Token::Op("+")) => {
                p.at += 1;
                p.unary()
            }
            _ => p.primary(),
        })
    }

    fn primary(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Token::LParen) => {
                let inner = self.or()?;
                match self.next() {
                    Some(Token::RParen) => Ok(inner),
                    _ => Err("a '(' is not closed".into()),
                }
            }
            Some(Token::Ident(name)) => Ok(Expr::Property(name)),
            Some(Token::Str(s)) => Ok(Expr::Literal(Value::Str(s))),
            Some(Token::Int(i)) => Ok(Expr::Literal(Value::Int(i))),
            Some(Token::Float(f)) => Ok(Expr::Literal(Value::Float(f))),
            Some(Token::Keyword("TRUE")) => Ok(Expr::Literal(Value::Bool(true))),
            Some(Token::Keyword("FALSE")) => Ok(Expr::Literal(Value::Bool(false))),
            Some(Token::Keyword("NULL")) => Err("compare with NULL using IS NULL or IS NOT NULL".into()),
            Some(t) => Err(format!("unexpected {}", describe(&t))),
            None => Err("the expression ends too early".into()),
        }
    }
}

fn describe(t: &Token) -> String {
    match t {
        Token::Ident(s) => format!("name {s:?}"),
        Token::Keyword(k) => k.to_string(),
        Token::Str(s) => format!("string '{s}'"),
        Token::Int(i) => i.to_string(),
        Token::Float(f) => f.to_string(),
        Token::Op(o) => format!("'{o}'"),
        Token::LParen => "'('".into(),
        Token::RParen => "')'".into(),
        Token::Comma => "','".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::record::{encode_record, encoded_len, Attributes, NewRecord};
    use proptest::prelude::*;

    fn record(tag: &str, props: &[(&str, &str)]) -> Vec<u8> {
        let mut r = NewRecord::new("t#0", b"x".to_vec());
        r.tag = tag.into();
        r.attributes = Attributes {
            user_properties: props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        let mut buf = vec![0u8; encoded_len(&r).unwrap()];
        encode_record(&mut buf, &r, &[0], 0, 1);
        buf
    }

    fn sql_matches(expression: &str, tag: &str, props: &[(&str, &str)]) -> bool {
        let bytes = record(tag, props);
        let view = RecordView::parse(&bytes).unwrap();
        Filter::parse(KIND_SQL, expression).unwrap().matches(&view)
    }

    #[test]
    fn comparisons_read_properties_as_numbers_or_text() {
        let props = [("a", "7"), ("b", "x"), ("c", "2.5"), ("flag", "true")];
        for (expr, want) in [
            ("a = 7", true),
            ("a > 5 AND b = 'x'", true),
            ("a >= 8", false),
            ("a <> 7", false),
            ("c < 3", true),
            ("c BETWEEN 2 AND 3", true),
            ("a NOT BETWEEN 1 AND 10", false),
            ("b IN ('y', 'x')", true),
            ("b NOT IN ('x')", false),
            ("b CONTAINS 'x' AND b STARTSWITH 'x' AND b ENDSWITH 'x'", true),
            ("flag = TRUE", true),
            ("a = 7.0", true),
            ("-a < 0", true),
            ("(a = 1 OR a = 7) AND NOT b = 'y'", true),
            ("TAGS = 'paid'", true),
            ("TAGS IN ('new')", false),
        ] {
            assert_eq!(sql_matches(expr, "paid", &props), want, "{expr}");
        }
    }

    #[test]
    fn missing_properties_are_null_and_only_true_matches() {
        let props = [("a", "1")];
        assert!(!sql_matches("z = 'x'", "", &props));
        assert!(!sql_matches("z <> 'x'", "", &props), "unknown is not a match");
        assert!(sql_matches("z IS NULL", "", &props));
        assert!(!sql_matches("a IS NULL", "", &props));
        assert!(sql_matches("a IS NOT NULL", "", &props));
        assert!(sql_matches("z = 'x' OR a = 1", "", &props), "unknown OR true is true");
        assert!(!sql_matches("NOT (z = 'x')", "", &props), "NOT unknown is unknown");
    }

    #[test]
    fn a_property_that_is_not_a_number_makes_only_its_comparison_unknown() {
        let props = [("a", "abc"), ("b", "x")];
        assert!(!sql_matches("a = 1", "", &props));
        assert!(sql_matches("a = 1 OR b = 'x'", "", &props));
    }

    #[test]
    fn bad_expressions_are_refused_with_a_reason() {
        for bad in [
            "",
            "a = ",
            "a = 1 junk",
            "a like 'x%'",
            "a = \"x\"",
            "a > 'x'",
            "a IN (1, 2)",
            "(a = 1",
            "a = NULL",
            "a BETWEEN 'x' AND 'y'",
            "a = 0x1F",
            "NOT",
        ] {
            let err = Filter::parse(KIND_SQL, bad).unwrap_err();
            assert!(!err.reason.is_empty(), "{bad}");
        }
        assert!(Filter::parse(KIND_SQL, &"(".repeat(200)).is_err(), "depth is bounded");
        assert!(Filter::parse(KIND_SQL, &format!("a = '{}'", "x".repeat(5000))).is_err(), "length is bounded");
        assert!(Filter::parse(9, "a").is_err());
    }

    #[test]
    fn tag_filters() {
        assert_eq!(Filter::parse(KIND_TAG, "*").unwrap(), Filter::All);
        assert_eq!(Filter::parse(KIND_TAG, "  ").unwrap(), Filter::All);
        let f = Filter::parse(KIND_TAG, "a || b").unwrap();
        assert!(f.may_pass(tag_hash("a")) && f.may_pass(tag_hash("b")) && !f.may_pass(tag_hash("c")));
        let bytes = record("b", &[]);
        assert!(f.matches(&RecordView::parse(&bytes).unwrap()));
        let bytes = record("c", &[]);
        assert!(!f.matches(&RecordView::parse(&bytes).unwrap()));
    }

    proptest! {
        #[test]
        fn any_text_parses_or_fails_without_panicking(text in "[ -~]{0,64}") {
            if let Ok(f) = Filter::parse(KIND_SQL, &text) {
                let bytes = record("t", &[("a", "1"), ("b", "x")]);
                let _ = f.matches(&RecordView::parse(&bytes).unwrap());
            }
        }
    }
}
