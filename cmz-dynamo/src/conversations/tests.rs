//! Regression tests of the item and cursor decoders (found by fuzzing).
use super::*;

/// Found by the `dynamo_items` fuzz target (fuzz/): a turn item whose `seq` is the
/// largest number made `item_end` and `messages_from_item` overflow (a panic in debug
/// builds, a wrapped sequence number in release ones).
/// Found by the `cursors_dynamo` fuzz target (fuzz/): a signed history cursor after
/// the largest sequence number overflowed while it was read. It is refused.
#[test]
fn a_history_cursor_after_the_last_sequence_number_is_refused() {
    let cursors = crate::fuzzing::Cursors::new(b"cursor-secret-cursor-secret-0123");
    let id = SessionId::new("conv_lion_user_00000000").unwrap();
    let cursor = cursors.history(&id, u64::MAX, 1).unwrap();
    assert_eq!(
        cursors.read_history(&id, &cursor).unwrap_err().code(),
        "validation_error"
    );
    let cursor = cursors.history(&id, u64::MAX - 1, u64::MAX).unwrap();
    assert_eq!(
        cursors.read_history(&id, &cursor).unwrap(),
        (u64::MAX - 1, u64::MAX)
    );
    let other = SessionId::new("conv_lion_other_00000000").unwrap();
    assert!(cursors.read_history(&other, &cursor).is_err());
}

#[test]
fn turn_items_at_the_end_of_the_sequence_are_errors_not_overflows() {
    let id = SessionId::new("conv_lion_u1_0a1b2c3d").unwrap();
    let message = |text: &str| {
        let mut map = Item::new();
        map.insert("messageId".into(), s("m1"));
        map.insert("role".into(), s("user"));
        map.insert("text".into(), s(text));
        map.insert("timestamp".into(), s("2024-05-01T10:00:00Z"));
        AttributeValue::M(map)
    };
    let mut item = Item::new();
    item.insert("seq".into(), n(u64::MAX));
    item.insert("msgs".into(), n(3));
    item.insert(
        "messages".into(),
        AttributeValue::L(vec![message("a"), message("b")]),
    );
    assert_eq!(item_end(&item).unwrap_err().code(), "internal_error");
    assert_eq!(
        messages_from_item(&id, &item).unwrap_err().code(),
        "internal_error"
    );
    // The last sequence number itself is fine when the item holds one message.
    item.insert("msgs".into(), n(1));
    item.insert("messages".into(), AttributeValue::L(vec![message("a")]));
    assert_eq!(item_end(&item).unwrap(), u64::MAX);
    assert_eq!(messages_from_item(&id, &item).unwrap()[0].seq, u64::MAX);
}

#[test]
fn items_round_trip() {
    let id = SessionId::new("conv_lion_u1_0a1b2c3d").unwrap();
    let mut m = NewMessage::new(Role::Assistant, "Roar! 🦁");
    m.metadata.latency_ms = Some(12);
    m.metadata.fallback = true;
    let q = NewMessage::new(Role::User, "Do lions nap?");
    let item = turn_item(&id, 7, &[q.clone(), m.clone()], 2, Some("k1"), Some(99)).unwrap();
    assert_eq!(item_end(&item).unwrap(), 8);
    let mut both = messages_from_item(&id, &item).unwrap();
    assert_eq!(
        (both[0].seq, both[0].content.as_str()),
        (7, "Do lions nap?")
    );
    let back = both.remove(1);
    assert_eq!(back.seq, 8);
    assert_eq!(back.content, m.content);
    assert_eq!(back.metadata, m.metadata);
    assert_eq!(back.created_at, m.created_at);
    let session = Session::new(
        id.clone(),
        UserId::new("u1").unwrap(),
        AnimalId::new("lion").unwrap(),
        "Leo",
    );
    let item = session_item(&session, 4, None);
    let back = session_from_item(&item).unwrap();
    assert_eq!(back.id, session.id);
    assert_eq!(back.animal_name, "Leo");
}
