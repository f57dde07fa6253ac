//! What the MCP tools show a model: bounded output, line windows of files, exact-string edits.
//! Pure functions, unit-tested here; the tools in [`super::tools`] call them.

use std::collections::VecDeque;

/// Bytes of a command's stdout (and, separately, stderr) `run_command` returns: the first
/// [`HEAD_BYTES`] and the last `OUTPUT_BYTES - HEAD_BYTES` (the end of a build log holds the
/// error), with a note of what was left out between them.
pub(crate) const OUTPUT_BYTES: usize = 32 * 1024;
/// Bytes kept from the start of a long output.
const HEAD_BYTES: usize = 8 * 1024;

/// One output stream, kept within [`OUTPUT_BYTES`]: its head and its tail.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    /// Every byte seen.
    total: u64,
}

impl Capture {
    /// Adds a chunk.
    pub(crate) fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let room = HEAD_BYTES.saturating_sub(self.head.len());
        let (to_head, rest) = data.split_at(room.min(data.len()));
        self.head.extend_from_slice(to_head);
        self.tail.extend(rest);
        let tail_room = OUTPUT_BYTES - HEAD_BYTES;
        if self.tail.len() > tail_room {
            let extra = self.tail.len() - tail_room;
            self.tail.drain(..extra);
        }
    }

    /// Bytes left out between head and tail.
    pub(crate) fn omitted(&self) -> u64 {
        self.total - (self.head.len() + self.tail.len()) as u64
    }

    /// Every byte seen.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// The text kept (invalid UTF-8 as U+FFFD), with a note where bytes were left out. A
    /// character cut by the head's end or the tail's start is left out with the gap (not
    /// shown as U+FFFD); head and tail that meet are decoded as one.
    pub(crate) fn text(&self) -> String {
        let (a, b) = self.tail.as_slices();
        let omitted = self.omitted();
        if omitted == 0 {
            let mut all = Vec::with_capacity(self.head.len() + a.len() + b.len());
            all.extend_from_slice(&self.head);
            all.extend_from_slice(a);
            all.extend_from_slice(b);
            return String::from_utf8_lossy(&all).into_owned();
        }
        let head = &self.head[..complete_prefix(&self.head)];
        let mut text = String::from_utf8_lossy(head).into_owned();
        text.push_str(&format!(
            "\n[... {omitted} bytes left out: the output was longer than {OUTPUT_BYTES} bytes; \
             redirect it to a file and read that in parts ...]\n"
        ));
        let mut tail = Vec::with_capacity(a.len() + b.len());
        tail.extend_from_slice(a);
        tail.extend_from_slice(b);
        // Continuation bytes at the start belong to a character whose first byte was dropped.
        let skip = tail
            .iter()
            .take(3)
            .take_while(|&&byte| byte & 0xC0 == 0x80)
            .count();
        text.push_str(&String::from_utf8_lossy(&tail[skip..]));
        text
    }
}

/// The length of `data` without an incomplete UTF-8 character at its end (a cut inside one).
pub(crate) fn complete_prefix(data: &[u8]) -> usize {
    match std::str::from_utf8(data) {
        Ok(_) => data.len(),
        // An incomplete sequence at the very end; invalid bytes elsewhere stay (as U+FFFD).
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => {
            // Look only at the last character's bytes.
            let start = data.len().saturating_sub(3);
            for i in (start..data.len()).rev() {
                let byte = data[i];
                if byte & 0xC0 != 0x80 {
                    let need = match byte {
                        0xC0..=0xDF => 2,
                        0xE0..=0xEF => 3,
                        0xF0..=0xF7 => 4,
                        _ => 1,
                    };
                    return if data.len() - i < need { i } else { data.len() };
                }
            }
            data.len()
        }
    }
}

/// Whether bytes are shown as text: valid UTF-8 without NUL bytes. A read that stopped inside
/// a character (`cut`) may end in an incomplete sequence.
pub(crate) fn is_text(data: &[u8], cut: bool) -> bool {
    if data.contains(&0) {
        return false;
    }
    match std::str::from_utf8(data) {
        Ok(_) => true,
        Err(e) => cut && e.error_len().is_none() && data.len() - e.valid_up_to() < 4,
    }
}

/// A window of a text file's lines.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Window {
    /// The lines, joined as in the file (each with its newline, the last maybe without).
    pub content: String,
    /// Number of the first line shown (1-based); `start` when nothing is shown.
    pub first_line: usize,
    /// Number of the last line shown (`first_line - 1` when none).
    pub last_line: usize,
    /// Lines in the text given.
    pub total_lines: usize,
    /// The window stopped at `max_bytes` before `limit` lines.
    pub cut: bool,
}

/// Lines `start` (1-based) to `start + limit - 1` of `text`, at most `max_bytes` of them (a
/// line that alone is longer is cut at a character boundary).
pub(crate) fn window(text: &str, start: usize, limit: usize, max_bytes: usize) -> Window {
    let start = start.max(1);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let total_lines = lines.len();
    let mut content = String::new();
    let mut last_line = start - 1;
    let mut cut = false;
    for (i, line) in lines.iter().enumerate().skip(start - 1).take(limit) {
        if content.len() + line.len() > max_bytes {
            if content.is_empty() {
                let mut end = max_bytes.min(line.len());
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                content.push_str(&line[..end]);
                last_line = i + 1;
            }
            cut = true;
            break;
        }
        content.push_str(line);
        last_line = i + 1;
    }
    Window {
        content,
        first_line: start,
        last_line,
        total_lines,
        cut,
    }
}

/// Why an edit cannot be made, as a model can act on it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EditError {
    /// `old_string` is empty.
    #[error("old_string is empty: give the exact text to replace (to write a whole file, use write_file)")]
    Empty,
    /// Old and new are the same.
    #[error("old_string and new_string are the same: nothing would change")]
    Same,
    /// Not in the file.
    #[error("old_string not found in {path}: it must match the file exactly, whitespace and indentation included; read_file shows the current content")]
    NotFound {
        /// The file.
        path: String,
    },
    /// More than once, without `replace_all`.
    #[error("old_string found {count} times in {path}: include more of the surrounding lines to make it unique, or set replace_all to replace every occurrence")]
    Ambiguous {
        /// The file.
        path: String,
        /// Occurrences.
        count: usize,
    },
}

/// The text with `old` replaced by `new`: exactly one occurrence unless `all`. Returns the new
/// text, the number of replacements and the byte offset of the first one.
pub(crate) fn replace(
    path: &str,
    text: &str,
    old: &str,
    new: &str,
    all: bool,
) -> Result<(String, usize, usize), EditError> {
    if old.is_empty() {
        return Err(EditError::Empty);
    }
    if old == new {
        return Err(EditError::Same);
    }
    let first = text.find(old).ok_or_else(|| EditError::NotFound {
        path: path.to_string(),
    })?;
    if !all {
        // Overlapping occurrences count too: "aa" is not unique in "aaa".
        let count = overlapping(text, old);
        if count > 1 {
            return Err(EditError::Ambiguous {
                path: path.to_string(),
                count,
            });
        }
        return Ok((text.replacen(old, new, 1), 1, first));
    }
    Ok((text.replace(old, new), text.matches(old).count(), first))
}

/// Occurrences of `needle` in `text`, overlapping ones included.
fn overlapping(text: &str, needle: &str) -> usize {
    let mut count = 0;
    let mut from = 0;
    while let Some(i) = text[from..].find(needle) {
        count += 1;
        let at = from + i;
        // The next start: one character further.
        from = at + text[at..].chars().next().map_or(1, char::len_utf8);
        if from > text.len() {
            break;
        }
    }
    count
}

/// Up to `context` lines around the replacement at byte `at` of `text` (spanning `len` bytes),
/// numbered like `cat -n`.
pub(crate) fn snippet(text: &str, at: usize, len: usize, context: usize) -> String {
    let line_of = |byte: usize| text[..byte.min(text.len())].matches('\n').count();
    let (first, last) = (line_of(at), line_of(at + len));
    let from = first.saturating_sub(context);
    text.lines()
        .enumerate()
        .skip(from)
        .take(last + context + 1 - from)
        .map(|(i, line)| format!("{:>6}\t{line}\n", i + 1))
        .collect()
}

/// `text` cut to at most `max` bytes at a character boundary, and whether it was cut.
pub(crate) fn bounded(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_output_keeps_head_and_tail_with_a_note() {
        let mut c = Capture::default();
        c.push(b"hello\n");
        assert_eq!(c.text(), "hello\n");
        assert_eq!(c.omitted(), 0);
        let mut c = Capture::default();
        for i in 0..20_000 {
            c.push(format!("line {i}\n").as_bytes());
        }
        assert!(c.omitted() > 0);
        let text = c.text();
        assert!(text.starts_with("line 0\nline 1\n"), "{}", &text[..40]);
        assert!(text.ends_with("line 19999\n"));
        assert!(text.contains("bytes left out"));
        assert_eq!(
            c.total(),
            (c.head.len() + c.tail.len()) as u64 + c.omitted()
        );
        assert!(c.head.len() + c.tail.len() <= OUTPUT_BYTES);
    }

    #[test]
    fn characters_cut_at_chunk_or_capture_boundaries_stay_whole() {
        // A character split across two chunks at the head's end.
        let mut c = Capture::default();
        let mut first = vec![b'x'; HEAD_BYTES - 1];
        first.push("é".as_bytes()[0]);
        c.push(&first);
        c.push(&["é".as_bytes()[1]]);
        c.push("ok".as_bytes());
        assert!(
            !c.text().contains('\u{FFFD}'),
            "{:?}",
            &c.text()[HEAD_BYTES - 4..]
        );
        assert!(c.text().ends_with("xéok"));
        // Long output of 3-byte characters: the cut head and tail drop partial characters.
        let mut c = Capture::default();
        for _ in 0..20_000 {
            c.push("€".as_bytes());
        }
        assert!(c.omitted() > 0);
        let text = c.text();
        assert!(!text.contains('\u{FFFD}'));
        assert!(text.starts_with('€') && text.ends_with('€'));
        assert_eq!(complete_prefix(&[b'a', 0xE2, 0x82]), 1);
        assert_eq!(complete_prefix(&[0xff, b'a', 0xE2]), 2);
        assert_eq!(complete_prefix("a€".as_bytes()), 4);
    }

    #[test]
    fn overlapping_matches_are_not_unique() {
        assert!(matches!(
            replace("/f", "aaa", "aa", "b", false),
            Err(EditError::Ambiguous { count: 2, .. })
        ));
        assert_eq!(replace("/f", "xaay", "aa", "b", false).unwrap().0, "xby");
        assert_eq!(overlapping("ééé", "éé"), 2);
    }

    #[test]
    fn text_and_binary_are_told_apart() {
        assert!(is_text(b"plain\n", false));
        assert!(!is_text(b"a\0b", false));
        assert!(!is_text(&[0xff, 0xfe], false));
        // A read cut inside a character is still text; the same bytes at the end of a file
        // are not.
        let e = "é".as_bytes();
        assert!(is_text(&[b'a', e[0]], true));
        assert!(!is_text(&[b'a', e[0]], false));
    }

    #[test]
    fn windows_of_lines() {
        let text = "a\nb\nc\nd";
        let w = window(text, 2, 2, 1000);
        assert_eq!(w.content, "b\nc\n");
        assert_eq!((w.first_line, w.last_line, w.total_lines), (2, 3, 4));
        assert!(!w.cut);
        let w = window(text, 3, 100, 1000);
        assert_eq!(w.content, "c\nd");
        assert_eq!(w.last_line, 4);
        let w = window(text, 9, 10, 1000);
        assert_eq!(w.content, "");
        assert_eq!(w.last_line, 8);
        let w = window(text, 1, 10, 4);
        assert_eq!(w.content, "a\nb\n");
        assert!(w.cut);
        let w = window("ééé\n", 1, 10, 3);
        assert_eq!(w.content, "é");
        assert!(w.cut);
    }

    #[test]
    fn edits_need_exactly_one_match_unless_all() {
        let text = "fn a() {}\nfn b() {}\nfn a() {}\n";
        assert_eq!(
            replace("/f", text, "fn b", "fn c", false).unwrap(),
            ("fn a() {}\nfn c() {}\nfn a() {}\n".to_string(), 1, 10)
        );
        assert_eq!(
            replace("/f", text, "fn a", "fn z", false),
            Err(EditError::Ambiguous {
                path: "/f".into(),
                count: 2
            })
        );
        assert_eq!(replace("/f", text, "fn a", "fn z", true).unwrap().1, 2);
        assert_eq!(
            replace("/f", text, "fn x", "y", false),
            Err(EditError::NotFound { path: "/f".into() })
        );
        assert_eq!(replace("/f", text, "", "y", false), Err(EditError::Empty));
        assert_eq!(replace("/f", text, "a", "a", false), Err(EditError::Same));
        let message = EditError::Ambiguous {
            path: "/f".into(),
            count: 3,
        }
        .to_string();
        assert!(message.contains("found 3 times"), "{message}");
    }

    #[test]
    fn snippets_number_lines_around_the_edit() {
        let text = "1\n2\n3\n4\n5\n6\n7\n";
        assert_eq!(snippet(text, 6, 1, 1), "     3\t3\n     4\t4\n     5\t5\n");
        assert_eq!(snippet(text, 0, 1, 2), "     1\t1\n     2\t2\n     3\t3\n");
    }

    #[test]
    fn bounded_cuts_at_characters() {
        assert_eq!(bounded("abc", 5), ("abc", false));
        assert_eq!(bounded("éé", 3), ("é", true));
    }
}
