//! Votes: one item per user, session and sequence number, replaced by a second vote.

use cmz_core::care::Vote;
use cmz_core::ids::{AnimalId, MessageId};

use super::*;
use crate::attr::{Reader, n, time};

/// The partition of a user's votes.
pub(super) fn feedback_pk(user: &UserId) -> String {
    format!("feedback#{user}")
}

/// The sequence number is zero-padded, so a session's votes sort by it.
fn feedback_sk(session: &SessionId, seq: u64) -> String {
    format!("{session}#{seq:020}")
}

fn feedback_item(feedback: &Feedback) -> Item {
    let mut item = Item::new();
    item.insert("pk".into(), s(feedback_pk(&feedback.user_id)));
    item.insert(
        "sk".into(),
        s(feedback_sk(&feedback.session_id, feedback.seq)),
    );
    item.insert("userId".into(), s(feedback.user_id.as_str()));
    item.insert("sessionId".into(), s(feedback.session_id.as_str()));
    item.insert("messageId".into(), s(feedback.message_id.as_str()));
    item.insert("seq".into(), n(feedback.seq));
    item.insert("ownerId".into(), s(feedback.owner_id.as_str()));
    item.insert("vote".into(), s(feedback.vote.as_str()));
    if let Some(note) = &feedback.note {
        item.insert("note".into(), s(note.clone()));
    }
    item.insert("animalId".into(), s(feedback.animal_id.as_str()));
    item.insert("persona".into(), s(feedback.persona.clone()));
    if let Some(model) = &feedback.model {
        item.insert("model".into(), s(model.clone()));
    }
    item.insert("at".into(), time(feedback.at));
    item
}

/// A stored vote.
pub(crate) fn feedback_from(item: &Item) -> Result<Feedback> {
    let reader = Reader::new(item, "feedback");
    Ok(Feedback {
        user_id: UserId::new(reader.str("userId")?)?,
        session_id: SessionId::new(reader.str("sessionId")?)?,
        message_id: MessageId::new(reader.str("messageId")?)?,
        seq: reader.u64("seq")?,
        owner_id: UserId::new(reader.str("ownerId")?)?,
        vote: reader.str("vote")?.parse::<Vote>()?,
        note: reader.opt_str("note").map(str::to_owned),
        animal_id: AnimalId::new(reader.str("animalId")?)?,
        persona: reader.opt_str("persona").unwrap_or_default().to_owned(),
        model: reader.opt_str("model").map(str::to_owned),
        at: reader.time("at")?,
    })
}

impl DynamoCareStore {
    /// One unconditional `PutItem`: a second vote replaces the first.
    pub(super) async fn put_vote(&self, feedback: &Feedback) -> Result<()> {
        let table = self.table();
        let out = self
            .client()
            .put_item()
            .table_name(table)
            .set_item(Some(feedback_item(feedback)))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("PutItem", table, e))?;
        self.db.inner.meter.record(out.consumed_capacity(), true);
        Ok(())
    }

    pub(super) async fn get_vote(
        &self,
        user: &UserId,
        session: &SessionId,
        seq: u64,
    ) -> Result<Option<Feedback>> {
        self.get(&feedback_pk(user), &feedback_sk(session, seq))
            .await?
            .as_ref()
            .map(feedback_from)
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone as _, Utc};

    use super::*;

    #[test]
    fn a_vote_reads_back_whole() {
        let vote = Feedback {
            user_id: UserId::new("kid#1").unwrap(),
            session_id: SessionId::new("conv_lion_kid_0000abcd").unwrap(),
            message_id: MessageId::new("m1").unwrap(),
            seq: 4,
            owner_id: UserId::new("kid#1").unwrap(),
            vote: Vote::Down,
            note: Some("lions do not eat ice cream".into()),
            animal_id: AnimalId::new("lion").unwrap(),
            persona: String::new(),
            model: None,
            at: Utc.timestamp_nanos(1_780_000_000_123_456_789),
        };
        let item = feedback_item(&vote);
        assert_eq!(item["sk"], s("conv_lion_kid_0000abcd#00000000000000000004"));
        assert_eq!(feedback_from(&item).unwrap(), vote);
    }
}
