//! Cron schedules as CronJobs write them: five fields (minute, hour, day of
//! month, month, day of week) with `*`, `?`, ranges, steps, lists and month
//! and weekday names, or a macro (`@hourly`, `@daily`, ...). As in cron, when
//! both day fields are restricted a day matching either one runs. Times are UTC.

use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::civil::DateTime;
use k8s_openapi::jiff::tz::TimeZone;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_any: bool,
    weekdays_any: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn value(text: &str, names: &[&str], offset: u32) -> Result<u32, String> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
        return Ok(i as u32 + offset);
    }
    text.parse().map_err(|_| format!("{text:?} is not a number"))
}

/// The bit set of one field; `max` inclusive.
fn field(text: &str, min: u32, max: u32, names: &[&str], offset: u32) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().map_err(|_| format!("bad step in {part:?}"))?),
            None => (part, 1),
        };
        if step == 0 {
            return Err(format!("zero step in {part:?}"));
        }
        let (low, high) = match range {
            "*" | "?" => (min, max),
            _ => match range.split_once('-') {
                Some((a, b)) => (value(a, names, offset)?, value(b, names, offset)?),
                // `5/15` means from 5 to the end.
                None if part.contains('/') => (value(range, names, offset)?, max),
                None => {
                    let v = value(range, names, offset)?;
                    (v, v)
                }
            },
        };
        if low < min || high > max || low > high {
            return Err(format!("{part:?} is outside {min}-{max}"));
        }
        let mut v = low;
        while v <= high {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = match text.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(format!(
                "{text:?}: expected 5 fields (minute hour day-of-month month day-of-week)"
            ));
        };
        let mut weekdays = field(weekday, 0, 7, &WEEKDAYS, 0)?;
        // 7 is Sunday too.
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7);
        }
        Ok(Schedule {
            minutes: field(minute, 0, 59, &[], 0)?,
            hours: field(hour, 0, 23, &[], 0)?,
            days: field(day, 1, 31, &[], 0)?,
            months: field(month, 1, 12, &MONTHS, 1)?,
            weekdays,
            days_any: day.starts_with('*') || day == "?",
            weekdays_any: weekday.starts_with('*') || weekday == "?",
        })
    }

    fn day_matches(&self, t: DateTime) -> bool {
        let day = self.days & (1 << t.day()) != 0;
        let weekday = self.weekdays & (1 << t.weekday().to_sunday_zero_offset()) != 0;
        match (self.days_any, self.weekdays_any) {
            (true, true) => true,
            (false, true) => day,
            (true, false) => weekday,
            (false, false) => day || weekday,
        }
    }

    /// The first scheduled minute strictly after `after`, within five years.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let utc = TimeZone::UTC;
        let start = after.to_zoned(utc.clone()).datetime();
        let mut t = start.with().second(0).subsec_nanosecond(0).build().ok()?;
        t = t.checked_add(k8s_openapi::jiff::Span::new().minutes(1)).ok()?;
        let limit = start.year() + 5;
        while t.year() <= limit {
            if self.months & (1 << t.month()) == 0 {
                let first = t.first_of_month().with().hour(0).minute(0).build().ok()?;
                t = first.checked_add(k8s_openapi::jiff::Span::new().months(1)).ok()?;
            } else if !self.day_matches(t) {
                let midnight = t.with().hour(0).minute(0).build().ok()?;
                t = midnight.checked_add(k8s_openapi::jiff::Span::new().days(1)).ok()?;
            } else if self.hours & (1 << t.hour()) == 0 {
                let hour = t.with().minute(0).build().ok()?;
                t = hour.checked_add(k8s_openapi::jiff::Span::new().hours(1)).ok()?;
            } else if self.minutes & (1 << t.minute()) == 0 {
                t = t.checked_add(k8s_openapi::jiff::Span::new().minutes(1)).ok()?;
            } else {
                return t.to_zoned(utc).ok().map(|z| z.timestamp());
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn next(schedule: &str, after: &str) -> String {
        Schedule::parse(schedule)
            .unwrap()
            .next_after(at(after))
            .map(|t| t.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn next_times() {
        assert_eq!(next("* * * * *", "2026-11-22T19:15:30Z"), "2026-11-22T19:16:00Z");
        assert_eq!(next("*/15 * * * *", "2026-11-22T19:15:00Z"), "2026-11-22T19:30:00Z");
        assert_eq!(next("@hourly", "2026-11-22T19:15:00Z"), "2026-11-22T20:00:00Z");
        assert_eq!(next("30 2 * * *", "2026-11-22T19:15:00Z"), "2026-11-23T02:30:00Z");
        assert_eq!(next("0 9 * * mon-fri", "2026-11-21T10:00:00Z"), "2026-11-23T09:00:00Z");
        assert_eq!(next("0 0 1 jan *", "2026-11-22T00:00:00Z"), "2027-01-01T00:00:00Z");
        assert_eq!(next("0 0 29 2 *", "2026-03-01T00:00:00Z"), "2028-02-29T00:00:00Z");
        // Both day fields restricted: either matches (the 1st, or a Sunday).
        assert_eq!(next("0 0 1 * 0", "2026-11-22T01:00:00Z"), "2026-11-29T00:00:00Z");
        assert_eq!(next("0 12 * * 7", "2026-11-22T13:00:00Z"), "2026-11-29T12:00:00Z");
        assert_eq!(
            next("5-10/5,40 * * * *", "2026-11-22T19:06:00Z"),
            "2026-11-22T19:10:00Z"
        );
    }

    #[test]
    fn bad_schedules_say_why() {
        for bad in ["* * * *", "60 * * * *", "*/0 * * * *", "* * * foo *", "5-1 * * * *"] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
        assert!(
            Schedule::parse("0 0 30 2 *")
                .unwrap()
                .next_after(at("2026-01-01T00:00:00Z"))
                .is_none()
        );
    }
}
