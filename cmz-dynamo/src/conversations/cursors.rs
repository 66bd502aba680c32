//! The signed cursors of history pages and session listings: each format written and read
//! in one place. A cursor carries its position and a keyed MAC over it, so a client can
//! neither forge one nor move one to another session or listing.

use super::*;

/// A history cursor: the page ended at message `seq`, and message `seq + 1` sits in the
/// item keyed `key`.
pub(crate) fn history_cursor(db: &Dynamo, id: &SessionId, seq: u64, key: u64) -> Result<Cursor> {
    let (seq, key) = (seq.to_string(), key.to_string());
    let signature = db.sign(&[HISTORY_CURSOR, id.as_str(), &seq, &key])?;
    Ok(Cursor::encode(
        HISTORY_CURSOR,
        &[id.as_str(), &seq, &key, &signature],
    ))
}

/// The `(seq, key)` of a history cursor made by [`history_cursor`] for session `id`;
/// anything else is a `validation_error`.
pub(crate) fn read_history_cursor(
    db: &Dynamo,
    id: &SessionId,
    cursor: &Cursor,
) -> Result<(u64, u64)> {
    let invalid = || Error::validation("cursor", "invalid or expired cursor");
    let parts = cursor.decode(HISTORY_CURSOR, 4)?;
    if parts[0] != id.as_str()
        || !db.verify(
            &[HISTORY_CURSOR, &parts[0], &parts[1], &parts[2]],
            &parts[3],
        )
    {
        return Err(invalid());
    }
    let after = parts[1].parse::<u64>().map_err(|_| invalid())?;
    let key = parts[2].parse::<u64>().map_err(|_| invalid())?;
    // No message comes after the last sequence number, so no page starts there.
    let next = after.checked_add(1).ok_or_else(invalid)?;
    if key == 0 || key > next {
        return Err(invalid());
    }
    Ok((after, key))
}

/// A session-listing cursor: the page ended at the session `id` last active `at` (the
/// index's sort key as stored), in the listing named `scope_tag`.
pub(crate) fn sessions_cursor(
    db: &Dynamo,
    scope_tag: &str,
    at: &str,
    id: &SessionId,
) -> Result<Cursor> {
    let signature = db.sign(&[SESSIONS_CURSOR, scope_tag, at, id.as_str()])?;
    Ok(Cursor::encode(
        SESSIONS_CURSOR,
        &[scope_tag, at, id.as_str(), &signature],
    ))
}

/// The `(at, session id)` of a listing cursor made by [`sessions_cursor`] for the listing
/// `scope_tag`; anything else is a `validation_error`.
pub(crate) fn read_sessions_cursor(
    db: &Dynamo,
    scope_tag: &str,
    cursor: &Cursor,
) -> Result<(String, String)> {
    let mut parts = cursor.decode(SESSIONS_CURSOR, 4)?;
    if parts[0] != scope_tag
        || !db.verify(
            &[SESSIONS_CURSOR, &parts[0], &parts[1], &parts[2]],
            &parts[3],
        )
    {
        return Err(Error::validation("cursor", "invalid or expired cursor"));
    }
    parts.truncate(3);
    let id = parts.pop().unwrap_or_default();
    let at = parts.pop().unwrap_or_default();
    Ok((at, id))
}
