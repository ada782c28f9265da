//! A `payments` step service: workflows charge a card with `uses: service/payments` and refund the
//! charge in the step's `compensate` (`docs/examples/payments.yaml`).
//!
//! ```sh
//! baton dev                                            # in one terminal
//! cargo run -p baton-sdk --bin payments-example       # in another (NATS_URL, BATON_* apply)
//! baton run docs/examples/payments.yaml --input '{"order": "o-1", "balance": 250}'
//! baton run docs/examples/payments.yaml --input '{"order": "o-2", "balance": 5000}'  # declined: the deposit is refunded
//! ```
//!
//! Step input: `{"amount": <number>, "order": <any>, "flaky": <bool>}`. Charges are kept in memory,
//! by idempotency key: the same step asked again (a retry, or a redelivery after an instance died)
//! gets the charge it already made, with the same id, and nothing is charged twice. An amount over
//! 1000 is declined for good (`card-declined`); `flaky: true` fails the first attempt with a
//! retryable error. Compensation input: `{"charge_id": <id>}`, refunded once whatever happens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use baton_sdk::{Context, Service, StepError};
use serde_json::{Value, json};

/// Charges larger than this are declined.
const LIMIT: f64 = 1000.0;

#[derive(Default)]
struct Ledger {
    /// Charges by the idempotency key of the step that made them.
    charges: HashMap<String, Value>,
    /// Refunds by charge id.
    refunds: HashMap<String, Value>,
}

fn charge(ledger: &Mutex<Ledger>, input: &Value, ctx: &Context) -> Result<Value, StepError> {
    let key = ctx.idempotency_key();
    let mut ledger = ledger.lock().expect("ledger lock");
    if let Some(done) = ledger.charges.get(key) {
        tracing::info!(
            key,
            attempt = ctx.attempt(),
            delivered = ctx.delivered(),
            "already charged: same charge"
        );
        return Ok(done.clone());
    }
    let amount = input["amount"].as_f64().ok_or_else(|| {
        StepError::permanent("`with.amount` must be a number, e.g. `amount: 42.5`")
            .with_code("bad-input")
    })?;
    if amount > LIMIT {
        return Err(StepError::permanent(format!(
            "card declined: {amount} is over the limit of {LIMIT}"
        ))
        .with_code("card-declined"));
    }
    if input["flaky"] == true && ctx.attempt() == 1 {
        return Err(StepError::retryable(
            "the card network did not answer in time",
        ));
    }
    let id = format!("ch-{}", ledger.charges.len() + 1);
    let done = json!({"charge_id": id, "amount": amount, "order": input["order"]});
    ledger.charges.insert(key.to_owned(), done.clone());
    tracing::info!(key, charge_id = %id, amount, "charged");
    Ok(done)
}

fn refund(ledger: &Mutex<Ledger>, input: &Value) -> Result<Value, StepError> {
    let id = input["charge_id"].as_str().ok_or_else(|| {
        StepError::permanent("`with.charge_id` must be the id of the charge to refund")
            .with_code("bad-input")
    })?;
    let mut ledger = ledger.lock().expect("ledger lock");
    if let Some(done) = ledger.refunds.get(id) {
        tracing::info!(charge_id = id, "already refunded: same refund");
        return Ok(done.clone());
    }
    let Some(amount) = ledger
        .charges
        .values()
        .find(|c| c["charge_id"] == id)
        .map(|c| c["amount"].clone())
    else {
        return Err(StepError::permanent(format!("no charge {id}")).with_code("unknown-charge"));
    };
    let done = json!({"refunded": id, "amount": amount});
    ledger.refunds.insert(id.to_owned(), done.clone());
    tracing::info!(charge_id = id, %amount, "refunded");
    Ok(done)
}

fn service(ledger: Arc<Mutex<Ledger>>) -> Service {
    let refunds = ledger.clone();
    Service::new("payments")
        .handler(move |input, ctx| {
            let ledger = ledger.clone();
            async move { charge(&ledger, &input, &ctx) }
        })
        .compensate(move |input, _ctx| {
            let ledger = refunds.clone();
            async move { refund(&ledger, &input) }
        })
}

#[tokio::main]
async fn main() -> Result<(), baton_sdk::Error> {
    service(Arc::default()).run_from_env().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_step_asked_again_gets_the_same_charge_and_is_charged_once() {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let s = service(ledger.clone());
        let ctx = Context::for_test("r1", "charge");
        let input = json!({"amount": 40, "order": "o-1"});
        let first = s.execute(input.clone(), ctx.clone()).await.unwrap();
        let again = s
            .execute(input.clone(), ctx.clone().with_delivered(2))
            .await
            .unwrap();
        let retry = s.execute(input, ctx.with_attempt(2)).await.unwrap();
        assert_eq!(
            first,
            json!({"charge_id": "ch-1", "amount": 40.0, "order": "o-1"})
        );
        assert_eq!((&again, &retry), (&first, &first));
        assert_eq!(ledger.lock().unwrap().charges.len(), 1);
        let other = s
            .execute(json!({"amount": 1}), Context::for_test("r2", "charge"))
            .await
            .unwrap();
        assert_eq!(other["charge_id"], "ch-2");
    }

    #[tokio::test]
    async fn large_amounts_are_declined_and_flaky_first_attempts_are_retryable() {
        let s = service(Arc::default());
        let err = s
            .execute(json!({"amount": 1000.5}), Context::for_test("r1", "charge"))
            .await
            .unwrap_err();
        assert_eq!(
            (err.is_retryable(), err.code()),
            (false, Some("card-declined"))
        );
        let err = s
            .execute(json!({"amount": "ten"}), Context::for_test("r1", "charge"))
            .await
            .unwrap_err();
        assert_eq!((err.is_retryable(), err.code()), (false, Some("bad-input")));
        let flaky = json!({"amount": 10, "flaky": true});
        let ctx = Context::for_test("r1", "charge");
        let err = s.execute(flaky.clone(), ctx.clone()).await.unwrap_err();
        assert!(err.is_retryable());
        let ok = s.execute(flaky, ctx.with_attempt(2)).await.unwrap();
        assert_eq!(ok["charge_id"], "ch-1");
    }

    #[tokio::test]
    async fn a_compensation_refunds_once() {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let s = service(ledger.clone());
        let ctx = Context::for_test("r1", "charge");
        let charged = s.execute(json!({"amount": 7}), ctx.clone()).await.unwrap();
        let undo = json!({"charge_id": charged["charge_id"]});
        let c = ctx.into_compensation();
        let first = s.execute(undo.clone(), c.clone()).await.unwrap();
        let again = s.execute(undo, c.clone().with_attempt(2)).await.unwrap();
        assert_eq!(first, json!({"refunded": "ch-1", "amount": 7.0}));
        assert_eq!(again, first);
        assert_eq!(ledger.lock().unwrap().refunds.len(), 1);
        let err = s
            .execute(json!({"charge_id": "ch-9"}), c)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("unknown-charge"));
    }
}
