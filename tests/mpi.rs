//! MPI bootstrap under `mpirun` (built with the feature `mpi` only). The parent tests start
//! this same test binary under mpirun, running only the ignored `mpi_rank_main` or the
//! test kit's checks (`check_rank`) on every rank.

use std::process::Command;

mod common;

fn mpirun_present() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn mpi_all_gather_under_mpirun() {
    if !mpirun_present() {
        common::skip("no working `mpirun` on PATH (apt install openmpi-bin libopenmpi-dev)");
        return;
    }
    let me = std::env::current_exe().unwrap();
    for n in [2usize, 4] {
        let out = Command::new("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "-n",
                &n.to_string(),
            ])
            .args([
                "--mca",
                "btl_tcp_if_include",
                "lo",
                "--mca",
                "oob_tcp_if_include",
                "lo",
            ])
            .arg(&me)
            .args([
                "--ignored",
                "--exact",
                "mpi_rank_main",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            // Started by mpirun with no store address, a build with MPI bootstraps through MPI.
            .env_remove("MASTER_ADDR")
            .env_remove("MASTER_PORT")
            .env_remove("HETCCL_INIT")
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "mpirun -n {n} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let mut ok: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.split_once("mpi all_gather ok: ").map(|(_, r)| r))
            .collect();
        ok.sort();
        assert_eq!(ok.len(), n, "{stdout}");
        // Every rank got rank 0's job id.
        let job = ok[0].rsplit(' ').next().unwrap();
        assert!(job.starts_with("mpi-"), "{job}");
        let want: Vec<String> = (0..n)
            .map(|k| format!("rank {k} of {n}, job {job}"))
            .collect();
        assert_eq!(ok, want);
    }
}

#[cfg(feature = "mpi")]
#[test]
#[ignore = "a rank of mpi_all_gather_under_mpirun; needs mpirun"]
fn mpi_rank_main() {
    use hetccl::bootstrap::{from_config, resolve_init};
    use hetccl::config::InitMethod;

    let cfg = hetccl::Config::from_env().unwrap();
    assert_eq!(resolve_init(&cfg), InitMethod::Mpi);
    let (mut b, auth) = from_config(&cfg).unwrap();
    let (rank, n) = (b.rank(), b.world_size());
    assert_eq!(
        (Some(rank), Some(n)),
        (cfg.launch.rank, cfg.launch.world_size)
    );
    // Rank k contributes k*3 bytes of value k: blobs of different lengths, one empty.
    let got = b.all_gather(&vec![rank as u8; rank * 3]).unwrap();
    let want: Vec<Vec<u8>> = (0..n).map(|k| vec![k as u8; k * 3]).collect();
    assert_eq!(got, want);
    b.barrier().unwrap();
    println!(
        "mpi all_gather ok: rank {rank} of {n}, job {}",
        auth.job_id()
    );
}

/// One rank of `collectives_under_mpirun` (the test kit's checks).
#[test]
#[ignore = "a rank of collectives_under_mpirun; needs mpirun"]
fn check_rank() {
    hetccl_testkit::check::rank_main();
}

/// Every collective through the test kit's checks (this test executable as every rank)
/// with ranks started by `mpirun`, peers found through MPI (shared memory between them,
/// as they share this host).
#[test]
fn collectives_under_mpirun() {
    if !mpirun_present() {
        common::skip("no working `mpirun` on PATH (apt install openmpi-bin libopenmpi-dev)");
        return;
    }
    let (argv, (var, val)) =
        hetccl_testkit::check::argv(&["--counts", "0,1,7,1000", "--mixed", "20"]);
    for (n, shm_disable) in [(2usize, "0"), (4, "0"), (2, "1")] {
        let out = Command::new("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "-n",
                &n.to_string(),
            ])
            .args([
                "--mca",
                "btl_tcp_if_include",
                "lo",
                "--mca",
                "oob_tcp_if_include",
                "lo",
            ])
            .args(["-x", &format!("HETCCL_SHM_DISABLE={shm_disable}")])
            .args(["-x", &format!("{var}={val}")])
            .args(&argv)
            .env_remove("MASTER_ADDR")
            .env_remove("MASTER_PORT")
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "mpirun -n {n} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.matches("checks passed").count(), n, "{stdout}");
        assert!(stdout.contains(&format!("rank 0/{n}: ")), "{stdout}");
    }
}
