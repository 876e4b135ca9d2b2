//! Workload arguments: `NAME key=value key=value ...`, whitespace-separated.

/// Parsed arguments. Borrowed from the boot-info page.
#[derive(Clone, Copy, Debug)]
pub struct Args<'a> {
    text: &'a str,
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

    /// A fraction in [0, 1], or `default` when absent.
    pub fn fraction(&self, key: &'a str, default: f64) -> Result<f64, BadArg<'a>> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => match v.parse::<f64>() {
                Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
                _ => Err(BadArg(key)),
            },
        }
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
