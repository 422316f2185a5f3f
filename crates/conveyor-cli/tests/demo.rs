//! `conveyor demo` end to end, with the order check it prints.

mod common;

use common::*;

#[test]
fn demo_strict_and_keyed_report_in_order() {
    let dir = tempfile::tempdir().unwrap();
    for ordering in ["strict", "keyed:16"] {
        let output = conveyor(dir.path())
            .args([
                "demo",
                "--items",
                "32",
                "--latency",
                "5ms",
                "--ordering",
                ordering,
                "--json",
            ])
            .output()
            .unwrap();
        expect_exit(&output, 0);
        let report = summary(&output);
        assert_eq!(report["in_order"], true, "{report}");
        assert_eq!(report["received"], 32, "{report}");
        assert_eq!(report["summary"]["delivered"], 32, "{report}");
        assert!(
            report["floor_secs"].as_f64().unwrap() <= report["strict_floor_secs"].as_f64().unwrap()
        );
    }
    let human = conveyor(dir.path())
        .args(["demo", "--items", "8", "--latency", "1ms"])
        .output()
        .unwrap();
    let (stdout, _) = texts(&human);
    assert_eq!(human.status.code(), Some(0));
    assert!(
        stdout.contains("order check: arrival order = input order: OK"),
        "{stdout}"
    );
    assert!(stdout.contains("producer loop"), "{stdout}");
}
