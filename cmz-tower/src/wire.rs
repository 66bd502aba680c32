//! Writing the bodies the busiest routes send: a timestamp without the formatting
//! machinery, and a JSON body serialized once into a buffer of the right size by a
//! writer that does less work per key and per string than serde_json (see [`json`]).

mod json;

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Serialize, Serializer};

/// A UTC time as chrono writes it in JSON (RFC 3339, `Z`, the fraction in 0, 3, 6 or 9
/// digits, whichever is exact), written straight into a buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rfc3339<'a>(pub(crate) &'a DateTime<Utc>);

impl Serialize for Rfc3339<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let time = self.0;
        let (year, nanos) = (time.year(), time.nanosecond());
        // Years of five digits or a sign, and leap seconds: chrono's own way.
        if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
            return time.serialize(serializer);
        }
        let mut out = Digits::default();
        out.number(year.unsigned_abs(), 4);
        out.byte(b'-');
        out.number(time.month(), 2);
        out.byte(b'-');
        out.number(time.day(), 2);
        out.byte(b'T');
        out.number(time.hour(), 2);
        out.byte(b':');
        out.number(time.minute(), 2);
        out.byte(b':');
        out.number(time.second(), 2);
        if nanos != 0 {
            let (value, digits) = if nanos % 1_000_000 == 0 {
                (nanos / 1_000_000, 3)
            } else if nanos % 1_000 == 0 {
                (nanos / 1_000, 6)
            } else {
                (nanos, 9)
            };
            out.byte(b'.');
            out.number(value, digits);
        }
        out.byte(b'Z');
        // Only ASCII digits and separators were written.
        let text = std::str::from_utf8(out.written()).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(text)
    }
}

/// A timestamp's characters, written into a fixed buffer.
#[derive(Debug, Default)]
struct Digits {
    out: [u8; 32],
    at: usize,
}

impl Digits {
    /// `value` in exactly `digits` decimal digits, zero-padded.
    fn number(&mut self, value: u32, digits: usize) {
        let mut rest = value;
        for slot in self.out[self.at..self.at + digits].iter_mut().rev() {
            *slot = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        self.at += digits;
    }

    fn byte(&mut self, byte: u8) {
        self.out[self.at] = byte;
        self.at += 1;
    }

    fn written(&self) -> &[u8] {
        &self.out[..self.at]
    }
}

/// The headers a busy route's response ends up with: its content type, `x-request-id`,
/// `Vary` and the four security headers, with room to spare.
const RESPONSE_HEADERS: usize = 12;

/// `value` as an `application/json` response, serialized into a buffer of `capacity`
/// bytes (a guess of its size, so the buffer rarely grows).
pub(crate) fn json_response<T: Serialize>(value: &T, capacity: usize) -> Response {
    match json::to_vec(value, capacity) {
        Ok(body) => {
            let mut response = Response::new(axum::body::Body::from(body));
            // Room for the headers the layers add on the way out (request id, `Vary`, the
            // security headers), so the map is not rebuilt bigger half way.
            let headers = response.headers_mut();
            *headers = HeaderMap::with_capacity(RESPONSE_HEADERS);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        // A value that cannot be written as JSON: axum's own answer (a 500 naming why).
        Err(_) => axum::Json(value).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    fn both(time: DateTime<Utc>) -> (String, String) {
        (
            serde_json::to_string(&Rfc3339(&time)).unwrap(),
            serde_json::to_string(&time).unwrap(),
        )
    }

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        let base = Utc.with_ymd_and_hms(2026, 12, 7, 6, 2, 6).unwrap();
        let mut times = vec![
            base,
            Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 6, 15, 12, 0, 0).unwrap(),
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
        ];
        for nanos in [
            1,
            10,
            999,
            1_000,
            120_000,
            1_000_000,
            7_000_000,
            622_720_369,
            999_999_999,
        ] {
            times.push(base + chrono::Duration::nanoseconds(nanos));
        }
        // A leap second, which chrono writes as second 60.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .unwrap()
            .and_utc();
        times.push(leap);
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let secs = (seed % 400_000_000_000) as i64 - 62_000_000_000;
            let nanos = match seed % 4 {
                0 => 0,
                1 => (seed >> 8) as u32 % 1000 * 1_000_000,
                2 => (seed >> 8) as u32 % 1_000_000 * 1_000,
                _ => (seed >> 8) as u32 % 1_000_000_000,
            };
            times.push(DateTime::from_timestamp(secs, nanos).unwrap());
        }
        for time in times {
            let (ours, chronos) = both(time);
            assert_eq!(ours, chronos, "{time:?}");
        }
    }

    #[tokio::test]
    async fn a_json_response_is_the_json_of_its_value() {
        let value = serde_json::json!({"a": [1, "b"], "c": "d\u{e9}\n"});
        let response = json_response(&value, 4);
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert!(response.headers().capacity() >= RESPONSE_HEADERS);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(body, serde_json::to_vec(&value).unwrap());
    }
}
