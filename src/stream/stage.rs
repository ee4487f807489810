//! Stages: filters between a stream's producer and its encoder.
//!
//! A stage sees every piece of text in order and passes on what the client
//! may see, when it may see it: redaction holds back only text that could
//! still become part of a match; a replay log keeps what a resumer needs.
//! The chain is ordered (the first stage sees the producer's text) and
//! allocation-free when empty: text goes straight to the encoder.

/// One filter in a stream's chain.
pub trait Stage: Send {
    /// A piece of text from the stage before; hand what may go on to `next`
    /// (any number of times, or not at all while it is held back).
    fn text(&mut self, text: &str, next: &mut dyn FnMut(&str));

    /// The stream is ending: hand on whatever is still held back.
    fn flush(&mut self, _next: &mut dyn FnMut(&str)) {}
}

/// Runs `text` through `stages` in order, then into `sink`.
pub(super) fn run(stages: &mut [Box<dyn Stage>], text: &str, sink: &mut dyn FnMut(&str)) {
    match stages.split_first_mut() {
        None => sink(text),
        Some((first, rest)) => first.text(text, &mut |t| run(rest, t, sink)),
    }
}

/// Flushes every stage in order: what the first one held goes through the
/// rest before the rest flush their own.
pub(super) fn flush(stages: &mut [Box<dyn Stage>], sink: &mut dyn FnMut(&str)) {
    if let Some((first, rest)) = stages.split_first_mut() {
        first.flush(&mut |t| run(rest, t, sink));
        flush(rest, sink);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Holds text back until it has seen `n` bytes, then passes it upper-cased.
    pub(crate) struct Upper {
        pub held: String,
        pub n: usize,
    }

    impl Stage for Upper {
        fn text(&mut self, text: &str, next: &mut dyn FnMut(&str)) {
            self.held.push_str(text);
            if self.held.len() >= self.n {
                next(&self.held.to_uppercase());
                self.held.clear();
            }
        }

        fn flush(&mut self, next: &mut dyn FnMut(&str)) {
            if !self.held.is_empty() {
                next(&self.held.to_uppercase());
                self.held.clear();
            }
        }
    }

    /// Doubles every piece.
    struct Twice;

    impl Stage for Twice {
        fn text(&mut self, text: &str, next: &mut dyn FnMut(&str)) {
            next(text);
            next(text);
        }
    }

    #[test]
    fn stages_run_in_order_and_flush_through_the_rest() {
        let mut chain: Vec<Box<dyn Stage>> = vec![
            Box::new(Upper {
                held: String::new(),
                n: 4,
            }),
            Box::new(Twice),
        ];
        let mut out = Vec::new();
        for t in ["ab", "cd", "e"] {
            run(&mut chain, t, &mut |t| out.push(t.to_string()));
        }
        assert_eq!(out, ["ABCD", "ABCD"]);
        flush(&mut chain, &mut |t| out.push(t.to_string()));
        assert_eq!(out, ["ABCD", "ABCD", "E", "E"]);
    }

    #[test]
    fn an_empty_chain_passes_text_through() {
        let mut out = Vec::new();
        run(&mut [], "x", &mut |t| out.push(t.to_string()));
        flush(&mut [], &mut |t| out.push(t.to_string()));
        assert_eq!(out, ["x"]);
    }
}
