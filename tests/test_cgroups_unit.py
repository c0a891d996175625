"""provisioning/cgroups.py on a fake cgroup filesystem: the cgroup v2 paths (this project's
machines run v1, which tests/test_local_sandbox.py exercises for real) and the reaper's
judgement of names. No root needed."""

from __future__ import annotations

import subprocess

from era_kernel.provisioning import cgroups


def _v2(tmp_path) -> cgroups.Support:
    own = tmp_path / "own"
    own.mkdir()
    (own / "cgroup.subtree_control").write_text("")
    (own / "era").mkdir()
    (own / "era" / "cgroup.subtree_control").write_text("cpu")
    return cgroups.Support(2, (cgroups._make_base(own, 2),))


def test_v2_base_enables_the_controllers_and_a_group_gets_its_limits(tmp_path):
    found = _v2(tmp_path)
    assert (tmp_path / "own" / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (tmp_path / "own" / "era" / "cgroup.subtree_control").read_text() == "+memory +pids"
    group = cgroups.KernelCgroup.for_kernel("0123456789", found)
    assert len(group.dirs) == 1 and group.memory_dir == group.pids_dir
    group.memory_dir.mkdir()
    (group.memory_dir / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n")
    assert group.oom_kills() == 2
    assert not group.hit_limit(), "v2 always counts kills: no guessing from limit hits"


def test_v2_create_writes_limits(tmp_path):
    found = _v2(tmp_path)
    group = cgroups.KernelCgroup.for_kernel("abcdef0123", found)
    group.create(128 * 1024**2, 32)  # plain directories: the limit files are created, not the interface's
    assert (group.memory_dir / "memory.max").read_text() == str(128 * 1024**2)
    assert (group.pids_dir / "pids.max").read_text() == "32"
    for leftover in group.memory_dir.iterdir():
        leftover.unlink()
    group.remove()
    assert not group.memory_dir.exists()


def test_reaper_judges_only_names_of_its_own_pid_namespace(tmp_path, monkeypatch):
    found = _v2(tmp_path)
    monkeypatch.setattr(cgroups, "_locate", lambda: (2, (tmp_path / "own",), ""))
    gone = subprocess.Popen(["true"])
    gone.wait()
    names = {
        "dead": cgroups.group_name("aaaaaaaaaa", (gone.pid, 1)),
        "live": cgroups.group_name("bbbbbbbbbb"),
        "other_namespace": f"{gone.pid}.1.1.cccccccccc",
        "foreign": "user.slice",
    }
    for name in names.values():
        (found.bases[0] / name).mkdir()
    assert cgroups.reap_orphans() == 1
    left = {p.name for p in found.bases[0].iterdir() if p.is_dir()}
    assert left == {names["live"], names["other_namespace"], names["foreign"]}


def test_enter_script_is_constant_and_moves_itself_before_exec(tmp_path):
    found = cgroups.Support(1, (tmp_path / "m", tmp_path / "p"))
    for base in found.bases:
        base.mkdir()
    group = cgroups.KernelCgroup(found, "x")
    for path in group.dirs:
        path.mkdir()
    argv = cgroups.wrap_argv(group, ["sh", "-c", "echo ran as $$"])
    assert argv[:3] == ["/bin/sh", "-c", cgroups.ENTER_SCRIPT]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    pid = out.split()[-1]
    assert all((d / "cgroup.procs").read_text().strip() == pid for d in group.dirs), "same process, then exec"
    (group.dirs[1] / "cgroup.procs").unlink()
    (group.dirs[1] / "cgroup.procs").mkdir()  # unwritable: the kernel must not start outside its group
    failed = subprocess.run(argv, capture_output=True, text=True)
    assert failed.returncode == 1 and "ran as" not in failed.stdout
