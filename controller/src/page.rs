//! Pagination for ListVolumes and ListSnapshots: the token is the index of the next entry
//! in the stable (ID-sorted) listing, so it stays valid across calls without server state.

use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::printable;

/// Cuts one page out of `all`; answers the page and the next token ("" at the end).
pub fn paginate<T>(all: Vec<T>, max_entries: i32, token: &str) -> Result<(Vec<T>, String)> {
    if max_entries < 0 {
        return Err(Error::invalid("max_entries", format!("{max_entries} is negative")));
    }
    let start = if token.is_empty() {
        0
    } else {
        let n: usize = token.parse().map_err(|_| Error::BadToken {
            token: printable(token),
            reason: "not a token this driver handed out".into(),
        })?;
        if n > all.len() {
            return Err(Error::BadToken {
                token: printable(token),
                reason: format!("past the end of the {} entries", all.len()),
            });
        }
        n
    };
    let len = if max_entries == 0 { usize::MAX } else { max_entries as usize };
    let end = start.saturating_add(len).min(all.len());
    let next = if end < all.len() { end.to_string() } else { String::new() };
    Ok((all.into_iter().skip(start).take(end - start).collect(), next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovol_core::error::Code;

    #[test]
    fn pages_cover_everything_once() {
        let all: Vec<u32> = (0..7).collect();
        let (p1, t1) = paginate(all.clone(), 3, "").expect("p1");
        let (p2, t2) = paginate(all.clone(), 3, &t1).expect("p2");
        let (p3, t3) = paginate(all.clone(), 3, &t2).expect("p3");
        assert_eq!([p1, p2, p3].concat(), all);
        assert_eq!(t3, "");
        assert_eq!(paginate(all.clone(), 0, "").expect("all").0.len(), 7);
    }

    #[test]
    fn bad_tokens_are_aborted_and_negative_sizes_invalid() {
        assert_eq!(paginate(vec![1], 1, "x").expect_err("x").code(), Code::Aborted);
        assert_eq!(paginate(vec![1], 1, "5").expect_err("5").code(), Code::Aborted);
        assert_eq!(paginate(vec![1], -1, "").expect_err("neg").code(), Code::InvalidArgument);
    }
}
