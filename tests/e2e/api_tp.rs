//! The coordinator's end-to-end cases (`api_cases.rs`) again with a tensor-parallel worker
//! group: SmolLM2 at `--tp 3` (one KV head per rank), over real processes: the
//! end-to-end coordinator tests pass with a tensor-parallel worker.

/// Extra `shardline up` flags of every cluster in the shared cases.
const UP_ARGS: &[&str] = &["--tp", "3"];

include!("api_cases.rs");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_reports_tp_3() {
    let up = Cluster::start(bin(), UP_ARGS);
    let mut w = WorkerClient::connect(up.worker.clone()).await.unwrap();
    let info = w.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.tp, 3);
}
