//! Id validation: every id type accepts exactly the strings the documented rule allows
//! (1 to the type's maximum bytes of printable ASCII other than `/` and `\`), through
//! `new`, `FromStr` and serde alike; what it accepts round-trips unchanged; and session
//! ids made from valid animal and user ids are valid.

#![no_main]

use cmz_core::ids::{
    AnimalId, FamilyId, MAX_ID_LEN, MAX_SESSION_ID_LEN, MessageId, SessionId, UserId,
};
use libfuzzer_sys::fuzz_target;

fn allowed(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != '\\')
}

macro_rules! check {
    ($ty:ty, $value:expr, $max:expr) => {{
        let value: &str = $value;
        let made = <$ty>::new(value);
        assert_eq!(
            made.is_ok(),
            allowed(value, $max),
            "{} accepts exactly the documented ids",
            stringify!($ty)
        );
        if let Err(error) = &made {
            assert_eq!(error.code(), "validation_error");
        }
        let parsed: Result<$ty, _> = value.parse();
        assert_eq!(parsed.is_ok(), made.is_ok(), "FromStr agrees with new");
        let json = serde_json::to_string(value).unwrap();
        let from_json: Result<$ty, _> = serde_json::from_str(&json);
        assert_eq!(from_json.is_ok(), made.is_ok(), "serde agrees with new");
        if let Ok(id) = made {
            assert_eq!(id.as_str(), value);
            assert_eq!(id.to_string(), value);
            assert_eq!(serde_json::to_string(&id).unwrap(), json);
            assert_eq!(from_json.unwrap(), id);
        }
    }};
}

// The input: `value \n other` as text; both are checked as every id type, and as the
// animal and user of a session id.
fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (value, other) = text.split_once('\n').unwrap_or((&text, ""));
    for value in [value, other] {
        check!(UserId, value, MAX_ID_LEN);
        check!(AnimalId, value, MAX_ID_LEN);
        check!(MessageId, value, MAX_ID_LEN);
        check!(FamilyId, value, MAX_ID_LEN);
        check!(SessionId, value, MAX_SESSION_ID_LEN);
    }
    if let (Ok(animal), Ok(user)) = (AnimalId::new(value), UserId::new(other)) {
        let suffix = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let id = SessionId::with_suffix(&animal, &user, suffix)
            .expect("a session id made of valid ids is valid");
        assert!(id.as_str().starts_with("conv_"));
        assert!(SessionId::generate(&animal, &user).is_ok());
    }
});
