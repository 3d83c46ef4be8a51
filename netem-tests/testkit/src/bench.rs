//! Benchmark settings from the environment: every knob has a default, and an unset or
//! unparsable variable means the default.

use std::str::FromStr;

/// The value of the environment variable `name` parsed as `T`, or `default` when unset or
/// unparsable.
pub fn env_parse<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// A number from the environment variable `name`, or `default` when unset or unparsable.
pub fn env_f64(name: &str, default: f64) -> f64 {
    env_parse(name, default)
}

/// A comma-separated list of numbers from `name` (or from `default` when unset); entries that
/// do not parse are skipped.
pub fn env_list(name: &str, default: &str) -> Vec<f64> {
    parse_list(&std::env::var(name).unwrap_or_else(|_| default.to_owned()))
}

fn parse_list(text: &str) -> Vec<f64> {
    text.split(',').filter_map(|s| s.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_variables_give_the_default() {
        assert_eq!(env_f64("FERRY_TESTKIT_SURELY_UNSET", 2.5), 2.5);
        assert_eq!(env_parse::<usize>("FERRY_TESTKIT_SURELY_UNSET", 3), 3);
        assert_eq!(env_list("FERRY_TESTKIT_SURELY_UNSET", "0.2, 50,x,150"), vec![0.2, 50.0, 150.0]);
    }

    #[test]
    fn lists_skip_what_does_not_parse() {
        assert_eq!(parse_list(""), Vec::<f64>::new());
        assert_eq!(parse_list("1,,2"), vec![1.0, 2.0]);
    }
}
