//! Every endpoint of the hub's API against its own OpenAPI document, with
//! schemathesis (pip; `tests/run` installs it) driving a real `outpost-hub
//! run` whose store holds a small fleet and its events: responses must
//! match their documented status codes, media types and schemas, and the
//! API must refuse requests without credentials.
//!
//! Examples are limited so the run stays around a minute on a loaded
//! 2-core machine.

use std::process::Command;

use anyhow::{ensure, Context as _, Result};
use outpost_tests::{Hub, Pki};

#[test]
fn every_endpoint_conforms_to_the_openapi_document() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    // A rate far above what the run sends: the limit is tested elsewhere.
    let hub = Hub::start_with_tables(
        dir.path(),
        &pki,
        "",
        "[api]\nlisten = \"127.0.0.1:0\"\nrate = 100000\nburst = 100000\n",
    )?;
    let (code, out, err) = hub.cli(&[
        "token",
        "create",
        "--name",
        "schemathesis",
        "--role",
        "policy-author",
    ])?;
    ensure!(code == 0, "token create: {err}");
    let token = out.lines().next().context("no token")?.trim().to_owned();
    let api = hub.api_url()?;
    let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args(["-m", "schemathesis.cli", "run"])
        .arg(format!("{api}/api/v1/openapi.json"))
        .args(["--url", &api])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all"])
        // Values the schema allows but the API refuses with a documented
        // 400 or 422 (an agent id with a space, a policy that does not
        // parse): documented refusals, not failures of the contract.
        .args(["--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", "15"])
        .args(["--generation-deterministic"])
        .args(["--request-timeout", "20"])
        .args(["--workers", "2"])
        .current_dir(dir.path())
        .output()
        .with_context(|| {
            format!("cannot run {python:?}: set OUTPOST_PYTHON to a Python 3 with schemathesis (pip install schemathesis)")
        })?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{report}");
    // A run that tested nothing would pass too: insist that it tested
    // every operation of the document.
    let number = |key: &str| -> Option<u64> {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.trim().split('/').next())
            .and_then(|n| n.trim().parse().ok())
    };
    let (selected, tested) = (number("Selected:"), number("Tested:"));
    ensure!(
        selected.is_some_and(|n| n >= 15) && tested == selected,
        "schemathesis did not test every operation ({tested:?} of {selected:?}):\n{report}"
    );
    ensure!(
        output.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        hub.log()
    );
    Ok(())
}
