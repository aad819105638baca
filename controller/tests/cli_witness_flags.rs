//! `twosite controller`'s witness flags through the real binary: bad combinations exit 2 with a
//! clear message, before the controller touches the cluster.

use std::process::Command;

fn controller(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twosite"))
        .arg("controller")
        .args(args)
        .env_remove("CLUSTER_NAME")
        // Never reach a real cluster if validation wrongly passed.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run twosite");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn token_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    std::fs::write(&path, "0123456789abcdef0123\n").expect("write token");
    let p = path.to_string_lossy().into_owned();
    (dir, p)
}

#[test]
fn bad_witness_flag_combinations_exit_2_with_a_clear_message() {
    let (_dir, token) = token_file();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--witness-url",
                "https://w.example:8443",
                "--witness-token-file",
                &token,
            ],
            "--cluster-name",
        ),
        (
            vec![
                "--witness-url",
                "https://w.example:8443",
                "--cluster-name",
                "prod",
            ],
            "--witness-token-file",
        ),
        (vec!["--witness-token-file", &token], "needs --witness-url"),
        (vec!["--witness-ca-file", "/ca.pem"], "needs --witness-url"),
        (
            vec![
                "--witness-url",
                "ftp://w.example",
                "--witness-token-file",
                &token,
                "--cluster-name",
                "prod",
            ],
            "https://",
        ),
        (
            vec![
                "--witness-url",
                "http://w.example:8080",
                "--witness-token-file",
                &token,
                "--cluster-name",
                "prod",
                "--witness-ca-file",
                "/ca.pem",
            ],
            "--witness-ca-file needs an https://",
        ),
        (
            vec![
                "--witness-url",
                "https://w.example",
                "--witness-token-file",
                &token,
                "--cluster-name",
                "prod/x",
            ],
            "--cluster-name",
        ),
        (
            vec![
                "--witness-url",
                "https://w.example",
                "--witness-token-file",
                "/nonexistent/token",
                "--cluster-name",
                "prod",
            ],
            "--witness-token-file",
        ),
    ];
    for (args, expected) in cases {
        let (code, err) = controller(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

#[test]
fn cluster_name_comes_from_the_environment_too() {
    let (_dir, token) = token_file();
    let out = Command::new(env!("CARGO_BIN_EXE_twosite"))
        .args([
            "controller",
            "--witness-url",
            "http://127.0.0.1:9",
            "--witness-token-file",
            &token,
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .env("CLUSTER_NAME", "prod")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run twosite");
    // Past flag validation: it fails later, on the missing cluster configuration (exit 1).
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
