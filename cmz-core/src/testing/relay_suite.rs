//! Conformance checks for [`StreamMirror`]s; every backend runs them.

use std::time::Duration;

use crate::ids::{SessionId, UserId};
use crate::relay::{MirrorEvent, MirroredStream, StreamMirror};

fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}", fastrand::u64(..))
}

fn piece(text: &str) -> MirrorEvent {
    MirrorEvent::Piece { text: text.into() }
}

/// Events are read after a number, exactly once, in order; a reader waits for new ones;
/// stops and reader marks are seen; everything goes after `keep`.
pub async fn check_stream_mirror(mirror: &dyn StreamMirror) {
    let keep = Duration::from_secs(30);
    let stream = unique("s");
    assert_eq!(
        mirror.info(&stream).await.unwrap(),
        None,
        "contract: unknown is None"
    );
    let info = MirroredStream {
        owner: UserId::new("kid1").unwrap(),
        session_id: SessionId::new(unique("sess")).unwrap(),
        session_created: true,
    };
    mirror.open(&stream, &info, keep).await.unwrap();
    assert_eq!(mirror.info(&stream).await.unwrap(), Some(info));
    assert!(
        mirror
            .read(&stream, 0, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty(),
        "contract: nothing yet is an empty list after the wait"
    );
    for (number, text) in [(1, "Hello "), (2, "there, "), (3, "friend!")] {
        mirror
            .append(&stream, number, &piece(text), keep)
            .await
            .unwrap();
    }
    let all = mirror.read(&stream, 0, Duration::ZERO).await.unwrap();
    assert_eq!(
        all.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [1, 2, 3],
        "contract: oldest first"
    );
    assert_eq!(all[2].1, piece("friend!"));
    let after = mirror.read(&stream, 2, Duration::ZERO).await.unwrap();
    assert_eq!(
        after,
        vec![(3, piece("friend!"))],
        "contract: only after `after`"
    );
    // A waiting reader gets the next event as soon as it is there.
    let waiting = mirror.read(&stream, 3, Duration::from_secs(5));
    let end = MirrorEvent::Failed {
        code: "unavailable".into(),
        message: "model down".into(),
    };
    let (read, ()) = tokio::join!(waiting, async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        mirror.append(&stream, 4, &end, keep).await.unwrap();
    });
    assert_eq!(
        read.unwrap(),
        vec![(4, end.clone())],
        "contract: a reader waits for new events"
    );
    assert!(end.is_end());

    assert!(!mirror.stop_requested(&stream).await.unwrap());
    mirror.request_stop(&stream, keep).await.unwrap();
    assert!(
        mirror.stop_requested(&stream).await.unwrap(),
        "contract: a stop is seen"
    );
    assert!(!mirror.touched(&stream).await.unwrap());
    mirror
        .touch(&stream, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(
        mirror.touched(&stream).await.unwrap(),
        "contract: a fresh mark is seen"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        !mirror.touched(&stream).await.unwrap(),
        "contract: marks go stale"
    );

    let short = unique("s");
    mirror
        .open(
            &short,
            &MirroredStream {
                session_created: false,
                ..mirror.info(&stream).await.unwrap().unwrap()
            },
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    mirror
        .append(&short, 1, &piece("x"), Duration::from_millis(200))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        mirror.info(&short).await.unwrap(),
        None,
        "contract: gone after keep"
    );
    assert!(
        mirror
            .read(&short, 0, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
}
