//! Stop strings: text that could still become a stop string is held back ("jailed"); a full match ends the choice and
//! neither the stop string nor anything after it is ever emitted (sgl-router `stop.rs`, Dynamo's jail).

/// What to do with newly decoded text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JailOutput {
    /// Emit this text (possibly empty: everything is held).
    Emit(String),
    /// A stop string matched: emit `text` (what preceded the match) and end the choice.
    Stopped { text: String, matched: String },
}

/// Per-choice stop-string state.
#[derive(Debug, Clone, Default)]
pub struct StopJail {
    stops: Vec<String>,
    held: String,
}

impl StopJail {
    /// Empty stop strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    /// Adds decoded text; returns what can be emitted now.
    pub fn push(&mut self, text: &str) -> JailOutput {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return JailOutput::Emit(std::mem::take(&mut self.held));
        }
        // Earliest full match wins (ties: the longer stop string).
        let hit = self.stops.iter().filter_map(|s| self.held.find(s.as_str()).map(|pos| (pos, std::cmp::Reverse(s.len()), s))).min();
        if let Some((pos, _, s)) = hit {
            let text = self.held[..pos].to_string();
            let matched = s.clone();
            self.held.clear();
            return JailOutput::Stopped { text, matched };
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let keep = self.held_suffix_len();
        let emit_len = self.held.len() - keep;
        let rest = self.held.split_off(emit_len);
        JailOutput::Emit(std::mem::replace(&mut self.held, rest))
    }

    /// Releases held text at the end of generation (no stop string can match any more).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn held_suffix_len(&self) -> usize {
        let h = &self.held;
        let mut best = 0;
        for s in &self.stops {
            // Candidate suffix lengths: up to len(s) - 1 (a full match was handled above), on char boundaries.
            let max = (s.len() - 1).min(h.len());
            for len in (best + 1..=max).rev() {
                let start = h.len() - len;
                if h.is_char_boundary(start) && s.starts_with(&h[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail(stops: &[&str]) -> StopJail {
        StopJail::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn emit(s: &str) -> JailOutput {
        JailOutput::Emit(s.into())
    }

    #[test]
    fn passes_text_through_without_stops() {
        let mut j = jail(&[]);
        assert_eq!(j.push("hello"), emit("hello"));
        assert_eq!(j.flush(), "");
    }

    #[test]
    fn holds_partial_matches_and_releases_them() {
        let mut j = jail(&["STOP"]);
        assert_eq!(j.push("abc S"), emit("abc "));
        assert_eq!(j.push("T"), emit(""));
        assert_eq!(j.push("x"), emit("STx"), "no longer a prefix: released");
        assert_eq!(j.push("ST"), emit(""));
        assert_eq!(j.flush(), "ST", "end of generation releases held text");
    }

    #[test]
    fn full_match_across_pieces_is_never_emitted() {
        let mut j = jail(&["\n\n", "END"]);
        assert_eq!(j.push("one\n"), emit("one"));
        assert_eq!(j.push("\ntwo"), JailOutput::Stopped { text: String::new(), matched: "\n\n".into() });
        let mut j = jail(&["END"]);
        assert_eq!(j.push("x E"), emit("x "));
        assert_eq!(j.push("NDING"), JailOutput::Stopped { text: String::new(), matched: "END".into() });
        let mut j = jail(&["b", "abc"]);
        assert_eq!(j.push("xabc"), JailOutput::Stopped { text: "x".into(), matched: "abc".into() }, "earliest match wins");
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        let mut j = jail(&["東京タワー"]);
        assert_eq!(j.push("今日は東"), emit("今日は"));
        assert_eq!(j.push("京"), emit(""));
        assert_eq!(j.push("駅"), emit("東京駅"));
        let mut j = jail(&["🚀!"]);
        assert_eq!(j.push("go 🚀"), emit("go "));
        assert_eq!(j.push("!"), JailOutput::Stopped { text: String::new(), matched: "🚀!".into() });
    }
}
