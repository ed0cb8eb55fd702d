//! `bench chain` and `bench fanout` on PostgreSQL alone: each size in its
//! own process, the figures as JSON, and the run's schema dropped after.

mod common;

fn schemas_named(url: &str, like: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connects");
        tokio::spawn(connection);
        client
            .query(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1",
                &[&like],
            )
            .await
            .expect("lists schemas")
            .iter()
            .map(|r| r.get(0))
            .collect()
    })
}

#[test]
fn chains_and_fan_outs_run_on_postgres_alone_and_leave_no_schema_behind() {
    let Some(url) = common::database_url() else {
        return;
    };
    let prefix = format!("shape-test-{}", std::process::id());
    for (shape, flag) in [("chain", "--steps"), ("fanout", "--items")] {
        let (ok, out, err) = common::cli(&[
            "bench",
            shape,
            flag,
            "10,30",
            "--backend",
            "postgres-only",
            "--database-url",
            &url,
            "--min-steps",
            "30",
            "--prefix",
            &prefix,
            "--json",
        ]);
        assert!(ok, "bench {shape} failed: {err}");
        let reports: Vec<serde_json::Value> = out
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        assert_eq!(reports.len(), 2, "one report per size: {out}");
        for (report, size) in reports.iter().zip([10, 30]) {
            assert_eq!(report["workload"], shape);
            assert_eq!(report["backend"], "postgres-only");
            assert_eq!(report["size"], size);
            let steps = report["steps"].as_u64().expect("steps");
            assert!(steps >= 30, "{report}");
            assert_eq!(steps, report["runs"].as_u64().expect("runs") * size);
            // The PostgreSQL store counts what it wrote.
            let written = report["store_bytes_per_step"].as_f64().expect("bytes");
            assert!(written > 100.0, "{report}");
        }
    }
    let like = format!("{}%", prefix.replace('-', "_"));
    assert_eq!(schemas_named(&url, &like), Vec::<String>::new());
}
