//! Budget periods and the answers to `GET /dp/budget_check`.

use contract::budget::{BudgetAnswer, BudgetReason, BudgetState};
use time::{Duration as Span, OffsetDateTime, Time};

use super::state::{Budget, FailMode, Period, Settings, Spend};

/// The period containing `now`: its start and, unless it never ends, its end (UTC
/// calendar days, weeks starting Monday, months).
pub fn bounds(period: Period, now: OffsetDateTime) -> (OffsetDateTime, Option<OffsetDateTime>) {
    let midnight = now.replace_time(Time::MIDNIGHT);
    match period {
        Period::Daily => (midnight, Some(midnight + Span::days(1))),
        Period::Weekly => {
            let start = midnight - Span::days(i64::from(now.weekday().number_days_from_monday()));
            (start, Some(start + Span::weeks(1)))
        }
        Period::Monthly => {
            let start = midnight.replace_day(1).unwrap_or(midnight);
            let next = match start.month() {
                time::Month::December => start
                    .replace_year(start.year() + 1)
                    .and_then(|d| d.replace_month(time::Month::January)),
                month => start.replace_month(month.next()),
            };
            (start, next.ok())
        }
        Period::Total => (OffsetDateTime::UNIX_EPOCH, None),
    }
}

/// The spend of the current period: a spend recorded for an earlier period is zero now.
pub fn current(spend: Option<&Spend>, period: Period, now: OffsetDateTime) -> Spend {
    let start = bounds(period, now).0.unix_timestamp();
    match spend {
        Some(s) if s.period_start_unix == start => s.clone(),
        _ => Spend {
            spent_usd: 0.0,
            period_start_unix: start,
        },
    }
}

fn mode(m: FailMode) -> contract::budget::FailMode {
    match m {
        FailMode::Open => contract::budget::FailMode::Open,
        FailMode::Closed => contract::budget::FailMode::Closed,
        FailMode::Sticky => contract::budget::FailMode::Sticky,
    }
}

fn period_name(p: Period) -> &'static str {
    match p {
        Period::Daily => "daily",
        Period::Weekly => "weekly",
        Period::Monthly => "monthly",
        Period::Total => "total",
    }
}

fn round_micros(usd: f64) -> f64 {
    (usd * 1e6).round() / 1e6
}

/// The answer for `api_key_id`: allowed without a budget; with one, allowed while the
/// period's spend is below the limit.
pub fn answer(
    api_key_id: &str,
    budget: Option<&Budget>,
    spend: Option<&Spend>,
    settings: &Settings,
    now: OffsetDateTime,
) -> BudgetAnswer {
    let Some(budget) = budget else {
        return BudgetAnswer {
            allow: true,
            fail_mode: mode(settings.default_fail_mode),
            ttl_seconds: Some(settings.budget_ttl_seconds),
            reason: None,
            budget: None,
        };
    };
    let spent = current(spend, budget.period, now).spent_usd;
    let (_, end) = bounds(budget.period, now);
    let reset_seconds = end.map(|e| (e - now).whole_seconds().max(1));
    let allow = spent < budget.limit_usd;
    let reason = (!allow).then(|| BudgetReason {
        kind: "billing_error".to_owned(),
        code: "budget_exceeded".to_owned(),
        message: format!(
            "Budget exceeded for API key {api_key_id}: spent ${} of ${} ({} budget).",
            round_micros(spent),
            budget.limit_usd,
            period_name(budget.period)
        ),
        scope: Some("api_key".to_owned()),
        scope_ref: Some(api_key_id.to_owned()),
        limit_usd: Some(budget.limit_usd),
        spent_usd: Some(round_micros(spent)),
        period: Some(period_name(budget.period).to_owned()),
        period_resets_at: end.and_then(|e| {
            e.format(&time::format_description::well_known::Rfc3339)
                .ok()
        }),
        retry_after_seconds: reset_seconds.and_then(|s| u64::try_from(s).ok()),
    });
    BudgetAnswer {
        allow,
        fail_mode: mode(budget.fail_mode),
        ttl_seconds: Some(budget.ttl_seconds.unwrap_or(settings.budget_ttl_seconds)),
        reason,
        budget: Some(BudgetState {
            limit_usd: budget.limit_usd,
            spent_usd: round_micros(spent),
            remaining_usd: round_micros((budget.limit_usd - spent).max(0.0)),
            reset_seconds,
            period: Some(period_name(budget.period).to_owned()),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use time::macros::datetime;

    #[test]
    fn periods_follow_the_utc_calendar() {
        let now = datetime!(2026-12-31 15:30 UTC); // a Thursday
        assert_eq!(
            bounds(Period::Daily, now),
            (
                datetime!(2026-12-31 0:00 UTC),
                Some(datetime!(2027-01-01 0:00 UTC))
            )
        );
        assert_eq!(
            bounds(Period::Weekly, now),
            (
                datetime!(2026-12-28 0:00 UTC),
                Some(datetime!(2027-01-04 0:00 UTC))
            )
        );
        assert_eq!(
            bounds(Period::Monthly, now),
            (
                datetime!(2026-12-01 0:00 UTC),
                Some(datetime!(2027-01-01 0:00 UTC))
            )
        );
        assert_eq!(
            bounds(Period::Monthly, datetime!(2026-02-10 1:00 UTC)).1,
            Some(datetime!(2026-03-01 0:00 UTC))
        );
        assert_eq!(bounds(Period::Total, now).1, None);
    }

    #[test]
    fn spend_of_an_earlier_period_counts_as_zero() {
        let now = datetime!(2026-11-21 12:00 UTC);
        let old = Spend {
            spent_usd: 9.0,
            period_start_unix: datetime!(2026-11-20 0:00 UTC).unix_timestamp(),
        };
        assert_eq!(current(Some(&old), Period::Daily, now).spent_usd, 0.0);
        assert_eq!(current(Some(&old), Period::Total, now).spent_usd, 0.0);
        let this = Spend {
            spent_usd: 2.5,
            period_start_unix: datetime!(2026-11-21 0:00 UTC).unix_timestamp(),
        };
        assert_eq!(current(Some(&this), Period::Daily, now).spent_usd, 2.5);
    }

    #[test]
    fn a_denial_carries_what_the_proxy_needs() {
        let now = datetime!(2026-11-21 23:00 UTC);
        let budget = Budget {
            limit_usd: 1.0,
            period: Period::Daily,
            fail_mode: FailMode::Closed,
            ttl_seconds: None,
        };
        let spend = current(None, Period::Daily, now);
        let spend = Spend {
            spent_usd: 1.25,
            ..spend
        };
        let a = serde_json::to_value(answer(
            "k1",
            Some(&budget),
            Some(&spend),
            &Settings::default(),
            now,
        ))
        .unwrap();
        assert_eq!(a["allow"], false);
        assert_eq!(a["fail_mode"], "closed");
        assert_eq!(a["ttl_seconds"], 5);
        assert_eq!(a["reason"]["code"], "budget_exceeded");
        assert_eq!(a["reason"]["scope_ref"], "k1");
        assert_eq!(a["reason"]["retry_after_seconds"], 3600);
        assert_eq!(a["reason"]["period_resets_at"], "2026-11-22T00:00:00Z");
        assert_eq!(a["budget"]["remaining_usd"], 0.0);
        let unbudgeted =
            serde_json::to_value(answer("k2", None, None, &Settings::default(), now)).unwrap();
        assert_eq!(unbudgeted["allow"], true);
        assert!(unbudgeted.get("reason").is_none());
    }
}
