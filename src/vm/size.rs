//! Sizes as lume writes them: `B`, `KB`, `MB`, `GB`, `TB` (case-insensitive,
//! binary multiples); a bare number means GB.

/// Why a size was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error(
        "Invalid size '{0}': write a number with an optional unit B, KB, MB, GB or TB (for example 512MB or 20GB)"
    )]
    Syntax(String),
    #[error("Size '{0}' is too large")]
    Overflow(String),
}

const UNITS: [(&str, u64); 5] = [
    ("TB", 1 << 40),
    ("GB", 1 << 30),
    ("MB", 1 << 20),
    ("KB", 1 << 10),
    ("B", 1),
];

/// Parses a size into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    let upper = s.to_ascii_uppercase();
    let (number, multiplier) = UNITS
        .iter()
        .find_map(|(unit, mult)| upper.strip_suffix(unit).map(|n| (n.trim(), *mult)))
        .unwrap_or((upper.as_str(), 1 << 30));
    let syntax = || SizeError::Syntax(input.to_string());
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(syntax());
    }
    if number.contains('.') {
        let value: f64 = number.parse().map_err(|_| syntax())?;
        let bytes = value * multiplier as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(SizeError::Overflow(input.to_string()));
        }
        return Ok(bytes.round() as u64);
    }
    let value: u64 = number
        .parse()
        .map_err(|_| SizeError::Overflow(input.to_string()))?;
    value
        .checked_mul(multiplier)
        .ok_or_else(|| SizeError::Overflow(input.to_string()))
}

/// Formats bytes the way lume prints them: `20.0GB`.
pub fn format_size(bytes: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut size = bytes as f64;
    let mut i = 0;
    while size >= 1024.0 && i < units.len() - 1 {
        size /= 1024.0;
        i += 1;
    }
    format!("{size:.1}{}", units[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_case_insensitively() {
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_size("2gb"), Ok(2 << 30));
        assert_eq!(parse_size("1Tb"), Ok(1 << 40));
        assert_eq!(parse_size("4096b"), Ok(4096));
        assert_eq!(parse_size("8kb"), Ok(8192));
        assert_eq!(parse_size("20"), Ok(20 << 30));
        assert_eq!(parse_size(" 1.5GB "), Ok(3 << 29));
    }

    #[test]
    fn refuses_garbage() {
        for s in ["12XB", "", "GB", "-1GB", "1 2GB", "1e3", "0x10", "1.2.3MB"] {
            assert!(matches!(parse_size(s), Err(SizeError::Syntax(_))), "{s:?}");
        }
        assert!(matches!(
            parse_size("99999999999TB"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats_like_lume() {
        assert_eq!(format_size(20 << 30), "20.0GB");
        assert_eq!(format_size(512), "512.0B");
        assert_eq!(format_size(1536 << 20), "1.5GB");
    }
}
