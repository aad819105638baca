//! One line for an error and its causes, for logs and for messages to the operator. Shared by
//! the controller and the node agent; no IO, so it is in the always-built core.

/// The error and all its sources, joined with `: `.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        // Some errors (kube's among them) already print their source: say it once.
        let message = e.to_string();
        if !out.contains(&message) {
            out.push_str(": ");
            out.push_str(&message);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::report;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Chained {
        text: &'static str,
        #[source]
        source: Option<Box<Chained>>,
    }

    /// `outer`, caused by `causes[0]`, caused by `causes[1]`...
    fn chain(outer: &'static str, causes: &[&'static str]) -> Chained {
        let source = causes
            .iter()
            .rev()
            .fold(None, |source: Option<Box<Chained>>, &text| {
                Some(Box::new(Chained { text, source }))
            });
        Chained {
            text: outer,
            source,
        }
    }

    #[test]
    fn every_cause_once_in_order() {
        assert_eq!(report(&chain("outer", &[])), "outer");
        assert_eq!(
            report(&chain("outer", &["middle", "inner"])),
            "outer: middle: inner"
        );
        // The outer message already quotes its cause: not repeated.
        assert_eq!(
            report(&chain("outer: middle", &["middle", "inner"])),
            "outer: middle: inner"
        );
    }
}
