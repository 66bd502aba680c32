//! Conformance checks for the auth stores; every backend runs all of them.

use std::time::Duration;

use chrono::{TimeDelta, Utc};

use crate::access::UserRole;
use crate::auth::{
    Family, FamilyDirectory, RateLimitStore, RefreshRecord, RefreshState, RevocationStore, User,
    UserStore, UserType,
};
use crate::ids::{FamilyId, UserId};

use super::store_suite::random_user;

fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}", fastrand::u64(..))
}

/// Runs every auth-store check.
pub async fn run_auth_store_suite(
    users: &dyn UserStore,
    families: &dyn FamilyDirectory,
    revocations: &dyn RevocationStore,
    limits: &dyn RateLimitStore,
) {
    check_user_store(users).await;
    check_family_directory(families).await;
    check_revocation_store(revocations).await;
    check_rate_limit_store(limits).await;
}

fn new_user() -> User {
    let id = random_user();
    User {
        email: format!("{}@example.org", id.as_str().to_lowercase()),
        user_id: id,
        display_name: "Tester Ünïcode 🦁".into(),
        role: UserRole::Student,
        user_type: UserType::Student,
        family_id: Some(FamilyId::new(unique("f")).unwrap()),
        password_hash: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
        soft_delete: false,
    }
}

/// Users: create, read by id and email, uniqueness, password updates.
pub async fn check_user_store(store: &dyn UserStore) {
    let user = new_user();
    store.create_user(&user).await.expect("create_user");
    assert_eq!(
        store.get_user(&user.user_id).await.unwrap().as_ref(),
        Some(&user),
        "contract: users round-trip"
    );
    assert_eq!(
        store.find_by_email(&user.email).await.unwrap().as_ref(),
        Some(&user)
    );
    assert!(
        store
            .find_by_email(&format!("x{}", user.email))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.get_user(&random_user()).await.unwrap().is_none());
    let same_id = User {
        email: format!("other-{}", user.email),
        ..user.clone()
    };
    assert_eq!(
        store.create_user(&same_id).await.unwrap_err().code(),
        "conflict",
        "contract: ids are unique"
    );
    let same_email = User {
        user_id: random_user(),
        ..user.clone()
    };
    assert_eq!(
        store.create_user(&same_email).await.unwrap_err().code(),
        "conflict",
        "contract: emails are unique"
    );
    store
        .set_password_hash(&user.user_id, "00112233445566778899aabbccddeeff:00")
        .await
        .unwrap();
    assert_eq!(
        store
            .get_user(&user.user_id)
            .await
            .unwrap()
            .unwrap()
            .password_hash
            .as_deref(),
        Some("00112233445566778899aabbccddeeff:00")
    );
    assert_eq!(
        store
            .set_password_hash(&random_user(), "x")
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    // Deleting a user leaves nothing to find them by; the email is free again.
    assert!(store.delete_user(&user).await.unwrap(), "contract: deleted");
    assert!(store.get_user(&user.user_id).await.unwrap().is_none());
    assert!(store.find_by_email(&user.email).await.unwrap().is_none());
    assert!(
        !store.delete_user(&user).await.unwrap(),
        "contract: repeating is harmless"
    );
    store
        .create_user(&same_email)
        .await
        .expect("contract: a deleted user's email may be used again");
}

/// Families: put, get, membership lookups.
pub async fn check_family_directory(directory: &dyn FamilyDirectory) {
    let (parent, a, b, outsider) = (random_user(), random_user(), random_user(), random_user());
    let family = Family {
        family_id: FamilyId::new(unique("fam")).unwrap(),
        family_name: "The Testers".into(),
        parents: vec![parent.clone()],
        students: vec![a.clone(), b.clone()],
        soft_delete: false,
        retention_days: None,
    };
    directory.put_family(&family).await.unwrap();
    assert_eq!(
        directory
            .get_family(&family.family_id)
            .await
            .unwrap()
            .as_ref(),
        Some(&family)
    );
    for member in [&parent, &a, &b] {
        let found = directory.families_of(member).await.unwrap();
        assert_eq!(
            found.iter().map(|f| &f.family_id).collect::<Vec<_>>(),
            vec![&family.family_id],
            "contract: families_of finds parents and students"
        );
    }
    assert!(directory.families_of(&outsider).await.unwrap().is_empty());
    let all = directory.list_families().await.unwrap();
    assert!(
        all.iter().any(|f| f.family_id == family.family_id),
        "contract: list_families lists every family"
    );
    assert!(
        all.windows(2).all(|w| w[0].family_id <= w[1].family_id),
        "contract: ordered by id"
    );
    let changed = Family {
        students: vec![a.clone()],
        retention_days: Some(0),
        ..family.clone()
    };
    directory.put_family(&changed).await.unwrap();
    assert!(
        directory.families_of(&b).await.unwrap().is_empty(),
        "contract: put_family replaces"
    );
    assert_eq!(
        directory.get_family(&changed.family_id).await.unwrap(),
        Some(changed.clone()),
        "contract: a family's retention is kept"
    );
    assert!(
        directory
            .get_family(&FamilyId::new(unique("nofam")).unwrap())
            .await
            .unwrap()
            .is_none()
    );
}

/// Refresh records are consumed exactly once; revocations hold until their time.
pub async fn check_revocation_store(store: &dyn RevocationStore) {
    let now = Utc::now();
    let record = RefreshRecord {
        token_hash: unique("hash"),
        chain_id: unique("chain"),
        user_id: random_user(),
        issued_at: now,
        expires_at: now + TimeDelta::days(1),
    };
    store.insert_refresh(&record).await.unwrap();
    assert_eq!(
        store.insert_refresh(&record).await.unwrap_err().code(),
        "conflict"
    );
    assert_eq!(
        store.consume_refresh("no-such-hash").await.unwrap(),
        RefreshState::Unknown
    );
    let consumers = (0..16).map(|_| store.consume_refresh(&record.token_hash));
    let outcomes = futures::future::join_all(consumers).await;
    let fresh = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(RefreshState::Fresh(_))))
        .count();
    let reused = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(RefreshState::Reused(_))))
        .count();
    assert_eq!(
        (fresh, reused),
        (1, 15),
        "contract: exactly one consumer sees the token fresh"
    );
    match &outcomes[0] {
        Ok(RefreshState::Fresh(r)) | Ok(RefreshState::Reused(r)) => assert_eq!(r, &record),
        other => panic!("{other:?}"),
    }
    // Forgetting a user removes their records, used or not, and no one else's.
    let other = RefreshRecord {
        token_hash: unique("hash"),
        chain_id: unique("chain"),
        user_id: random_user(),
        issued_at: now,
        expires_at: now + TimeDelta::days(1),
    };
    let second = RefreshRecord {
        token_hash: unique("hash"),
        ..record.clone()
    };
    store.insert_refresh(&other).await.unwrap();
    store.insert_refresh(&second).await.unwrap();
    assert_eq!(
        store.forget_user(&record.user_id).await.unwrap(),
        2,
        "contract: every record of the user"
    );
    assert_eq!(
        store.consume_refresh(&second.token_hash).await.unwrap(),
        RefreshState::Unknown
    );
    assert_eq!(store.forget_user(&record.user_id).await.unwrap(), 0);
    assert!(matches!(
        store.consume_refresh(&other.token_hash).await.unwrap(),
        RefreshState::Fresh(_)
    ));

    let (jti, family) = (unique("jti"), unique("fam"));
    assert!(!store.is_revoked(Some(&jti), Some(&family)).await.unwrap());
    store
        .revoke_token_id(&jti, now + TimeDelta::hours(1))
        .await
        .unwrap();
    assert!(store.is_revoked(Some(&jti), None).await.unwrap());
    assert!(store.is_revoked(Some(&jti), Some(&family)).await.unwrap());
    assert!(!store.is_revoked(None, Some(&family)).await.unwrap());
    store
        .revoke_chain(&family, now + TimeDelta::hours(1))
        .await
        .unwrap();
    assert!(store.is_revoked(None, Some(&family)).await.unwrap());
    assert!(
        !store
            .is_revoked(Some(&unique("jti")), Some(&unique("fam")))
            .await
            .unwrap()
    );
    assert!(!store.is_revoked(None, None).await.unwrap());
    let (old_jti, old_family) = (unique("jti"), unique("fam"));
    store
        .revoke_token_id(&old_jti, now - TimeDelta::seconds(1))
        .await
        .unwrap();
    store
        .revoke_chain(&old_family, now - TimeDelta::seconds(1))
        .await
        .unwrap();
    assert!(
        !store
            .is_revoked(Some(&old_jti), Some(&old_family))
            .await
            .unwrap(),
        "contract: revocations end at their time"
    );
}

/// Counters count every hit, reset, and start a new window when one ends.
pub async fn check_rate_limit_store(store: &dyn RateLimitStore) {
    let key = unique("rate:");
    let window = Duration::from_secs(60);
    assert_eq!(store.peek(&key, window).await.unwrap().count, 0);
    let hits = futures::future::join_all((0..10).map(|_| store.hit(&key, window))).await;
    let mut counts: Vec<u32> = hits.into_iter().map(|h| h.unwrap().count).collect();
    counts.sort_unstable();
    assert_eq!(
        counts,
        (1..=10).collect::<Vec<u32>>(),
        "contract: concurrent hits are all counted"
    );
    let peeked = store.peek(&key, window).await.unwrap();
    assert_eq!(peeked.count, 10);
    assert!(
        peeked.resets_at > Utc::now() && peeked.resets_at <= Utc::now() + TimeDelta::seconds(61)
    );
    store.reset(&key).await.unwrap();
    assert_eq!(store.peek(&key, window).await.unwrap().count, 0);
    let short = unique("rate:");
    store.hit(&short, Duration::from_millis(200)).await.unwrap();
    store.hit(&short, Duration::from_millis(200)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        store
            .peek(&short, Duration::from_millis(200))
            .await
            .unwrap()
            .count,
        0,
        "contract: windows end"
    );
    assert_eq!(
        store
            .hit(&short, Duration::from_millis(200))
            .await
            .unwrap()
            .count,
        1,
        "contract: a new window starts at 1"
    );
    let other = UserId::new(unique("u")).unwrap();
    assert_eq!(store.peek(other.as_str(), window).await.unwrap().count, 0);
    check_rate_limit_totals(store).await;
}

/// `add` is an atomic "add while below the ceiling": concurrent adds at the edge pass it by
/// at most one amount; taking back always applies and never goes below 0.
pub async fn check_rate_limit_totals(store: &dyn RateLimitStore) {
    let window = Duration::from_secs(60);
    let key = unique("total:");
    let empty = store.add(&key, 0, u64::MAX, window).await.unwrap();
    assert_eq!(
        (empty.total, empty.added),
        (0, true),
        "contract: a new total is 0"
    );
    let adds =
        futures::future::join_all((0..20).map(|_| store.add(&key, 100, 1_050, window))).await;
    let admitted = adds.iter().filter(|a| a.as_ref().unwrap().added).count();
    assert_eq!(
        admitted, 11,
        "contract: adds get in while the total is below the ceiling (0..=1,000 of 1,050)"
    );
    let refused = adds
        .iter()
        .find(|a| !a.as_ref().unwrap().added)
        .unwrap()
        .as_ref()
        .unwrap();
    assert!(
        refused.total >= 1_050,
        "a refusal reports the total that refused it"
    );
    let total = store.add(&key, 0, u64::MAX, window).await.unwrap();
    assert_eq!(total.total, 1_100, "contract: over by at most one amount");
    assert!(total.resets_at > Utc::now() && total.resets_at <= Utc::now() + TimeDelta::seconds(61));
    let back = store.add(&key, -300, 0, window).await.unwrap();
    assert_eq!(
        (back.total, back.added),
        (800, true),
        "contract: taking back always applies"
    );
    let again = store.add(&key, 10, 1_000, window).await.unwrap();
    assert_eq!((again.total, again.added), (810, true));
    let floor = store.add(&key, -5_000, 0, window).await.unwrap();
    assert_eq!(floor.total, 0, "contract: never below 0");
    store.add(&key, 40, 1_000, window).await.unwrap();
    store.reset(&key).await.unwrap();
    assert_eq!(
        store.add(&key, 0, u64::MAX, window).await.unwrap().total,
        0,
        "contract: reset clears a total too"
    );
    let short = unique("total:");
    store
        .add(&short, 7, 100, Duration::from_millis(200))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        store
            .add(&short, 0, u64::MAX, Duration::from_millis(200))
            .await
            .unwrap()
            .total,
        0,
        "contract: totals end with their window"
    );
    assert_eq!(
        store
            .add(&short, 5, 100, Duration::from_millis(200))
            .await
            .unwrap()
            .total,
        5,
        "contract: a new window starts from the amount"
    );
}
