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

#[test]
fn demo_says_nothing_of_a_journal_it_does_not_keep() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    let help = conveyor(dir.path())
        .args(["demo", "--help"])
        .output()
        .unwrap();
    let (text, _) = expect_exit(&help, 0);
    assert!(!text.contains("journal"), "{text}");

    let mut child = spawn(dir.path(), &["demo", "--items", "40", "--latency", "200ms"]);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("listening"), "{first}");
    // The demo prints its first line with Ctrl-C already handled. Whether any item was
    // accepted by then does not matter: the demo must not say it was kept, nor how to keep it.
    signal(&child, "INT");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let output = child.wait_with_output().unwrap();
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(3), "{rest}\n{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        !rest.contains("--no-journal") && !stderr.contains("--no-journal"),
        "{rest}\n{stderr}"
    );
}

#[test]
fn demo_without_a_floor_prints_no_percentage_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let zero = conveyor(dir.path())
        .args(["demo", "--items", "0"])
        .output()
        .unwrap();
    let (_, stderr) = expect_exit(&zero, 2);
    assert!(stderr.contains("--items"), "{stderr}");
    let instant = conveyor(dir.path())
        .args(["demo", "--items", "5", "--latency", "0ms"])
        .output()
        .unwrap();
    let (stdout, _) = expect_exit(&instant, 0);
    assert!(!stdout.contains("% over"), "{stdout}");
}
