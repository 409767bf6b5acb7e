//! The real binary refuses to start while a variable of the old naming
//! scheme is set, naming the variable that replaced it: silently ignoring
//! an operator's setting would be fail-open. The check runs before anything
//! is bound or connected, so this needs no database.

use std::process::Command;

#[test]
fn booking_service_refuses_an_old_variable_and_names_the_new_one() {
    let output = Command::new(env!("CARGO_BIN_EXE_booking-service"))
        .arg("serve")
        .env("MEMORY_SERVICE_URL", "http://127.0.0.1:50051")
        // Nothing it could reach if it did start: the refusal must come first.
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("GRPC_ADDR", "127.0.0.1:0")
        .env("ADMIN_ADDR", "off")
        .env("AUTH_MODE", "none")
        .env_remove("RUST_LOG")
        .output()
        .expect("run booking-service");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "it started: {stdout}{stderr}");
    assert!(
        stderr.contains("MEMORY_SERVICE_URL is now BOOKING_MEMORY_URL"),
        "stderr: {stderr}\nstdout: {stdout}"
    );
}
