//! Workload arguments: `NAME key=value key=value ...`, whitespace-separated.

/// Parsed arguments. Borrowed from the boot-info page.
#[derive(Clone, Copy, Debug)]
pub struct Args<'a> {
    text: &'a str,
}

/// A number written as a decimal (`0.25`) or a ratio (`1/4`, its denominator positive and
/// both finite), spaces around either part allowed; `None` for anything else. Callers check
/// the range they need.
pub fn ratio(text: &str) -> Option<f64> {
    match text.trim().split_once('/') {
        None => text.trim().parse::<f64>().ok(),
        Some((num, den)) => match (num.trim().parse::<f64>(), den.trim().parse::<f64>()) {
            (Ok(num), Ok(den)) if den > 0.0 && num.is_finite() && den.is_finite() => {
                Some(num / den)
            }
            _ => None,
        },
    }
}

/// An argument that is present but not a number of the right kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadArg<'a>(pub &'a str);

impl<'a> Args<'a> {
    pub fn new(text: &'a str) -> Self {
        Self { text }
    }

    /// The first word (the workload name), if any.
    pub fn name(&self) -> Option<&'a str> {
        self.text
            .split_whitespace()
            .next()
            .filter(|w| !w.contains('='))
    }

    fn raw(&self, key: &str) -> Option<&'a str> {
        self.text
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// An unsigned integer argument, or `default` when absent.
    pub fn u64(&self, key: &'a str, default: u64) -> Result<u64, BadArg<'a>> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| BadArg(key)),
        }
    }

    /// A fraction in [0, 1], written as a decimal (`0.25`) or a ratio (`1/4`), or `default`
    /// when absent. Ratios because the natural way to say "one page in 64" is `1/64`.
    pub fn fraction(&self, key: &'a str, default: f64) -> Result<f64, BadArg<'a>> {
        let Some(v) = self.raw(key) else {
            return Ok(default);
        };
        match ratio(v) {
            Some(f) if (0.0..=1.0).contains(&f) => Ok(f),
            _ => Err(BadArg(key)),
        }
    }

    /// A switch written `0` or `1`, or `default` when absent.
    pub fn flag(&self, key: &'a str, default: bool) -> Result<bool, BadArg<'a>> {
        match self.raw(key) {
            None => Ok(default),
            Some("0") => Ok(false),
            Some("1") => Ok(true),
            Some(_) => Err(BadArg(key)),
        }
    }

    /// One of `options`, or `default` when absent; any other word is refused.
    pub fn choice(
        &self,
        key: &'a str,
        options: &[&'a str],
        default: &'a str,
    ) -> Result<&'a str, BadArg<'a>> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => options.iter().copied().find(|o| *o == v).ok_or(BadArg(key)),
        }
    }

    /// The first `key=value` word whose key is not in `known`: a misspelt key would otherwise
    /// be ignored silently and the workload would run with a default the user did not want.
    pub fn unknown_key(&self, known: &[&str]) -> Option<&'a str> {
        self.text
            .split_whitespace()
            .skip(usize::from(self.name().is_some()))
            .map(|w| w.split_once('=').map_or(w, |(k, _)| k))
            .find(|k| !known.contains(k))
    }

    /// A non-negative float, or `default` when absent.
    pub fn float(&self, key: &'a str, default: f64) -> Result<f64, BadArg<'a>> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => match v.parse::<f64>() {
                Ok(f) if f >= 0.0 && f.is_finite() => Ok(f),
                _ => Err(BadArg(key)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_take_decimals_and_ratios_in_range() {
        let args = Args::new("w a=0.25 b=1/64 c=3/2 d=1/0 e=-1/4 f=x/2 g=nan h=1 i=0/5");
        assert_eq!(args.fraction("a", 0.0), Ok(0.25));
        assert_eq!(args.fraction("b", 0.0), Ok(1.0 / 64.0));
        assert_eq!(args.fraction("c", 0.0), Err(BadArg("c")));
        assert_eq!(args.fraction("d", 0.0), Err(BadArg("d")));
        assert_eq!(args.fraction("e", 0.0), Err(BadArg("e")));
        assert_eq!(args.fraction("f", 0.0), Err(BadArg("f")));
        assert_eq!(args.fraction("g", 0.0), Err(BadArg("g")));
        assert_eq!(args.fraction("h", 0.0), Ok(1.0));
        assert_eq!(args.fraction("i", 0.5), Ok(0.0));
        assert_eq!(args.fraction("absent", 0.5), Ok(0.5));
    }

    #[test]
    fn flags_are_zero_or_one() {
        let args = Args::new("w a=1 b=0 c=yes d=");
        assert_eq!(args.flag("a", false), Ok(true));
        assert_eq!(args.flag("b", true), Ok(false));
        assert_eq!(args.flag("c", false), Err(BadArg("c")));
        assert_eq!(args.flag("d", false), Err(BadArg("d")));
        assert_eq!(args.flag("absent", true), Ok(true));
    }

    #[test]
    fn choices_are_one_of_their_options() {
        let args = Args::new("w a=text b=prose c=");
        let options = ["text", "random"];
        assert_eq!(args.choice("a", &options, "random"), Ok("text"));
        assert_eq!(args.choice("b", &options, "text"), Err(BadArg("b")));
        assert_eq!(args.choice("c", &options, "text"), Err(BadArg("c")));
        assert_eq!(args.choice("absent", &options, "random"), Ok("random"));
    }

    #[test]
    fn unknown_keys_are_named_and_the_workload_name_is_not_one() {
        assert_eq!(Args::new("w a=1 b=2").unknown_key(&["a", "b"]), None);
        assert_eq!(Args::new("w a=1 bb=2").unknown_key(&["a", "b"]), Some("bb"));
        assert_eq!(Args::new("w a=1 stray").unknown_key(&["a"]), Some("stray"));
        assert_eq!(Args::new("a=1 b=2").unknown_key(&["a"]), Some("b"));
        assert_eq!(Args::new("").unknown_key(&[]), None);
    }
}
