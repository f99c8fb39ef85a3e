//! Devices end to end, with the real kubectl on `sedna up` and real peers: a Modbus TCP
//! thermostat (pymodbus, `examples/devices/modbus_sensor.py`) and an MQTT sensor behind a real
//! broker (Debian `mosquitto`, driven with `mosquitto_pub` / `mosquitto_sub`). The edge's
//! mappers read the devices, write desired values to them, report coalesced twins to the cloud,
//! and say why when a device is unreachable or misconfigured. A protocol without a built-in
//! mapper (OPC UA, an asyncua server) is served by the shipped user's mapper
//! (`examples/devices/mappers/opcua_mapper.py`) over `proto/mapper.proto`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

mod support;
use support::{Kubectl, Procs, free_port, root, up_with, wait_until};

fn modbus_sensor(port: u16) -> Child {
    Command::new(root().join(".venv/bin/python"))
        .arg(root().join("examples/devices/modbus_sensor.py"))
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("the Modbus sensor needs .venv with pymodbus (scripts/setup)")
}

fn mosquitto(dir: &std::path::Path, port: u16) -> Child {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto is not installed (scripts/setup installs it)")
}

/// Waits until the API serves the devices.sedna.io kinds.
fn devices_served(kubectl: &Kubectl) {
    wait_until("the device CRDs", Duration::from_secs(30), || {
        kubectl
            .run(&["get", "devices"])
            .status
            .success()
            .then_some(())
    });
}

/// A Dataset's `numberOfSamples`, once counted.
fn samples(kubectl: &Kubectl, dataset: &str) -> Option<u64> {
    kubectl
        .ok(&[
            "get",
            "dataset",
            dataset,
            "-o",
            "jsonpath={.status.numberOfSamples}",
        ])
        .trim()
        .parse()
        .ok()
}

/// The device as JSON, when it exists.
fn device(kubectl: &Kubectl, name: &str) -> Option<Value> {
    let out = kubectl.run(&["get", "device", name, "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// A twin's reported value.
fn reported(device: &Value, property: &str) -> Option<String> {
    device
        .pointer("/status/twins")?
        .as_array()?
        .iter()
        .find(|t| t["propertyName"] == property)?
        .pointer("/reported/value")?
        .as_str()
        .map(str::to_owned)
}

/// Established TCP connections to a local port (the server's side, from /proc/net/tcp).
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local address "0100007F:PORT" in hex; state 01: ESTABLISHED.
            fields.len() > 3 && fields[1].ends_with(&format!(":{port:04X}")) && fields[3] == "01"
        })
        .count()
}

fn state(device: &Value) -> Option<&str> {
    device.pointer("/status/state")?.as_str()
}

/// Waits until `ok` holds for device `name`; says what was last seen when it never does.
fn wait_device(kubectl: &Kubectl, name: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        if let Some(d) = device(kubectl, name) {
            if ok(&d) {
                return d;
            }
            last = d;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: never; last seen {:#}", last["status"]);
}

fn events_about(kubectl: &Kubectl, name: &str) -> String {
    kubectl.ok(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "-o",
        "custom-columns=REASON:.reason,MESSAGE:.message",
    ])
}

const THERMOSTAT: &str = r#"
apiVersion: devices.sedna.io/v1beta1
kind: DeviceModel
metadata: { name: thermostat }
spec:
  protocol: modbus
  properties:
  - name: temperature
    type: FLOAT
    unit: Celsius
    visitors: { configData: { register: InputRegister, offset: 0, dataType: int16, scale: 0.1 } }
  - name: setpoint
    type: FLOAT
    accessMode: ReadWrite
    visitors: { configData: { register: HoldingRegister, offset: 0, dataType: float32 } }
  - name: heater
    type: BOOLEAN
    visitors: { configData: { register: CoilRegister, offset: 0 } }
"#;

fn thermostat(name: &str, port: u16, setpoint: &str, register: &str) -> String {
    format!(
        r#"
apiVersion: devices.sedna.io/v1beta1
kind: Device
metadata: {{ name: {name} }}
spec:
  deviceModelRef: {{ name: thermostat }}
  nodeName: edge-1
  protocol: {{ protocolName: modbus, configData: {{ ip: 127.0.0.1, port: {port} }} }}
  properties:
  - {{ name: temperature, collectCycle: 200, reportToCloud: true,
      visitors: {{ configData: {{ register: {register} }} }} }}
  - {{ name: setpoint, collectCycle: 200, reportToCloud: true, desired: {{ value: "{setpoint}" }} }}
  - {{ name: heater, collectCycle: 200, reportToCloud: true }}
  capture: {{ dataset: {name}-readings, properties: [temperature, heater], maxSamples: 20 }}
"#
    )
}

/// The Dataset a thermostat's readings are captured into.
fn readings(name: &str, captured: &std::path::Path) -> String {
    format!(
        r#"
apiVersion: sedna.io/v1alpha1
kind: Dataset
metadata: {{ name: {name}-readings }}
spec:
  url: {}/{name}/readings.csv
  format: csv
  nodeName: edge-1
"#,
        captured.display()
    )
}

#[test]
fn mappers_read_and_write_real_devices_and_twins_reach_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let (mut procs, modbus_port, mqtt_port) = (Procs(Vec::new()), free_port(), free_port());
    procs.0.push(modbus_sensor(modbus_port));
    procs.0.push(mosquitto(dir.path(), mqtt_port));
    let (_up, kubectl) = up_with(&dir.path().join("up"), 1, &["--twin-interval", "1s"]);

    // Modbus: the thermostat reads 21.5 °C; the desired set point is written to the device
    // (read back from its holding registers), and the device's own logic turns the heater on.
    let captured = dir
        .path()
        .join("up")
        .canonicalize()
        .unwrap()
        .join("captured");
    // `up` waits for the sedna.io CRDs; the devices.sedna.io ones may come a moment later.
    devices_served(&kubectl);
    kubectl.apply(THERMOSTAT);
    kubectl.apply(&readings("thermo-1", &captured));
    kubectl.apply(&thermostat(
        "thermo-1",
        modbus_port,
        "23.5",
        "InputRegister",
    ));
    let d = wait_device(&kubectl, "thermo-1", "the thermostat's twins", |d| {
        reported(d, "setpoint").as_deref() == Some("23.5")
            && reported(d, "heater").as_deref() == Some("true")
    });
    assert_eq!(reported(&d, "temperature").as_deref(), Some("21.5"));
    assert_eq!(state(&d), Some("online"));
    let twin = &d["status"]["twins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["propertyName"] == "setpoint")
        .unwrap()
        .clone();
    assert_eq!(twin["observedDesired"]["value"], "23.5", "{twin}");
    assert!(
        twin.pointer("/reported/metadata/timestamp")
            .and_then(Value::as_str)
            .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()),
        "{twin}"
    );
    // `kubectl get devices` shows the node and the state.
    let listed = kubectl.ok(&["get", "devices"]);
    let row = listed
        .lines()
        .find(|l| l.starts_with("thermo-1"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        row.contains("thermostat") && row.contains("edge-1") && row.contains("online"),
        "{listed}"
    );
    // A new desired value goes down and is written.
    kubectl.ok(&[
        "patch",
        "device",
        "thermo-1",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/properties/1/desired/value","value":"19"}]"#,
    ]);
    wait_device(&kubectl, "thermo-1", "the new set point", |d| {
        reported(d, "setpoint").as_deref() == Some("19")
            && reported(d, "heater").as_deref() == Some("false")
    });

    // The readings are recorded into the Dataset on the node (the set point is not: it is
    // not among the captured properties), bounded to the newest 20 rows, and counted.
    let file = captured.join("thermo-1/readings.csv");
    wait_until(
        "captured rows beyond the bound",
        Duration::from_secs(30),
        || {
            events_about(&kubectl, "thermo-1")
                .contains("CaptureTrimmed")
                .then_some(())
        },
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(text.lines().next(), Some("timestamp,device,property,value"));
    assert!(!rows.is_empty() && rows.len() <= 20, "{text}");
    assert!(
        rows.iter()
            .any(|r| r.ends_with(",thermo-1,temperature,21.5")),
        "{text}"
    );
    assert!(!text.contains("setpoint"), "{text}");
    wait_until(
        "the Dataset's sample count",
        Duration::from_secs(30),
        || {
            let n = samples(&kubectl, "thermo-1-readings")?;
            (n > 0 && n <= 20).then_some(())
        },
    );

    // MQTT: the desired fan state is published; the sensor's JSON readings become the twin.
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
        .args(["-t", "site/air-1/fan/set", "-C", "1", "-W", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    kubectl.apply(&format!(
        r#"
apiVersion: devices.sedna.io/v1beta1
kind: DeviceModel
metadata: {{ name: air }}
spec:
  protocol: mqtt
  properties:
  - {{ name: temperature, type: DOUBLE, visitors: {{ configData: {{ topic: site/air-1/state, jsonPointer: /t }} }} }}
  - {{ name: fan, type: BOOLEAN, accessMode: ReadWrite, visitors: {{ configData: {{ topic: site/air-1/fan }} }} }}
---
apiVersion: devices.sedna.io/v1beta1
kind: Device
metadata: {{ name: air-1 }}
spec:
  deviceModelRef: {{ name: air }}
  nodeName: edge-1
  protocol: {{ configData: {{ broker: "tcp://127.0.0.1:{mqtt_port}" }} }}
  properties:
  - {{ name: temperature, reportToCloud: true }}
  - {{ name: fan, reportToCloud: true, desired: {{ value: "true" }} }}
"#
    ));
    let published = sub.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&published.stdout).trim(), "true");
    let mut reading = 0;
    wait_until(
        "the MQTT reading in the cloud",
        Duration::from_secs(30),
        || {
            reading += 1;
            let out = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
                .args(["-t", "site/air-1/state", "-m"])
                .arg(format!(r#"{{"t": 18.{reading}, "rh": 40}}"#))
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            std::thread::sleep(Duration::from_millis(300));
            let d = device(&kubectl, "air-1")?;
            reported(&d, "temperature")
                .filter(|t| t.starts_with("18."))
                .map(|_| ())
        },
    );
    // A reading that is not what the model says is refused with the reason, not reported.
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
        .args(["-t", "site/air-1/state", "-m", r#"{"t": "warm"}"#])
        .status()
        .unwrap();
    wait_until(
        "the refusal of a bad reading",
        Duration::from_secs(30),
        || {
            events_about(&kubectl, "air-1")
                .contains("\"warm\" is not a number")
                .then_some(())
        },
    );

    // The Modbus device goes away: the device turns offline with the reason; when it returns,
    // the mapper (restarted with back-off) finds it again.
    let sensor = procs.0.remove(0);
    drop(Procs(vec![sensor]));
    wait_device(&kubectl, "thermo-1", "offline", |d| {
        state(d) == Some("offline")
    });
    assert!(
        events_about(&kubectl, "thermo-1").contains("DeviceUnreachable"),
        "{}",
        events_about(&kubectl, "thermo-1")
    );
    procs.0.push(modbus_sensor(modbus_port));
    wait_device(&kubectl, "thermo-1", "online again", |d| {
        state(d) == Some("online")
    });

    // The Device is deleted: its mapper stops and lets go of the device (no connection to
    // the Modbus peer remains).
    assert!(
        connections_to(modbus_port) > 0,
        "the mapper holds a connection"
    );
    kubectl.ok(&["delete", "device", "thermo-1"]);
    wait_until(
        "the deleted device's mapper to disconnect",
        Duration::from_secs(30),
        || (connections_to(modbus_port) == 0).then_some(()),
    );

    // A misconfigured device is refused with the field named.
    kubectl.apply(&thermostat("thermo-bad", modbus_port, "20", "Input"));
    wait_device(&kubectl, "thermo-bad", "unhealthy", |d| {
        state(d) == Some("unhealthy")
    });
    let events = events_about(&kubectl, "thermo-bad");
    assert!(
        events.contains("InvalidDevice") && events.contains("register \"Input\""),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_and_live_values_go_on_while_the_hub_is_down_and_the_latest_twins_follow_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (api, kubeconfig) = support::apiserver(&d.join("api"));
    let mut procs = Procs(vec![api]);
    support::client(&kubeconfig).await;
    let hub_port = free_port();
    procs.0.push(support::hub(d, &kubeconfig, hub_port));
    let cloud = format!("127.0.0.1:{hub_port}");
    let node = d.join("edge-1");
    support::join(
        &node,
        &cloud,
        &support::token(&kubeconfig, "edge-1"),
        "edge-1",
    );
    let captured = d.join("captured");
    std::fs::create_dir_all(&captured).unwrap();
    let captured = captured.canonicalize().unwrap();
    procs.0.push(support::edge_with(
        &node,
        &cloud,
        &[
            "--twin-interval",
            "1s",
            "--capture-dir",
            captured.to_str().unwrap(),
        ],
    ));
    let modbus_port = free_port();
    procs.0.push(
        Command::new(root().join(".venv/bin/python"))
            .arg(root().join("examples/devices/modbus_sensor.py"))
            .args(["--port", &modbus_port.to_string(), "--drift"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let kubectl = Kubectl::new(&kubeconfig).expect("kubectl is installed by scripts/setup");
    kubectl.ok(&[
        "apply",
        "-f",
        root().join("crds/manifests").to_str().unwrap(),
    ]);
    devices_served(&kubectl);
    kubectl.apply(THERMOSTAT);
    kubectl.apply(&readings("thermo-1", &captured));
    kubectl.apply(
        &thermostat("thermo-1", modbus_port, "23.5", "InputRegister")
            .replace("maxSamples: 20", "maxSamples: 100000"),
    );
    let first = wait_device(&kubectl, "thermo-1", "the first twins", |d| {
        reported(d, "temperature").is_some()
    });
    let stamp = |d: &Value| {
        d["status"]["twins"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["propertyName"] == "temperature"))
            .and_then(|t| t.pointer("/reported/metadata/timestamp"))
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .unwrap_or_default()
    };
    let file = captured.join("thermo-1/readings.csv");
    let rows = || {
        std::fs::read_to_string(&file)
            .map(|t| t.lines().count().saturating_sub(1))
            .unwrap_or(0)
    };

    // The hub goes away; the node keeps reading and recording.
    let mut hub = procs.0.remove(1);
    hub.kill().unwrap();
    hub.wait().unwrap();
    let before = rows();
    let down_at = jiff::Timestamp::now();
    wait_until(
        "rows recorded while the hub is down",
        Duration::from_secs(30),
        || (rows() >= before + 30).then_some(()),
    );
    // Nothing reaches the cloud meanwhile.
    let seen = device(&kubectl, "thermo-1").unwrap();
    assert!(stamp(&seen) <= down_at, "{} vs {down_at}", stamp(&seen));
    // Apps on the node read the live values from its local API all along.
    let local = Kubectl::new(&node.join("metaserver/kubeconfig")).unwrap();
    let mut live = Vec::new();
    wait_until(
        "live values on the node's local API",
        Duration::from_secs(30),
        || {
            let d = device(&local, "thermo-1")?;
            let t = stamp(&d);
            if t > down_at && !live.contains(&t) {
                live.push(t);
            }
            (live.len() >= 2).then_some(())
        },
    );

    // The hub returns: the latest values (read after it went away) arrive.
    procs.0.insert(1, support::hub(d, &kubeconfig, hub_port));
    let back = wait_device(
        &kubectl,
        "thermo-1",
        "twins read while the hub was down",
        |d| stamp(d) > down_at,
    );
    assert!(stamp(&back) > stamp(&first));
    assert!(rows() >= before + 30);
}

#[test]
fn cameras_are_recorded_as_frames_into_a_dataset_directory() {
    let dir = tempfile::tempdir().unwrap();
    // A real stream: ffmpeg serving a video as HTTP MJPEG, and the same video as a file.
    let clip = dir.path().join("clip.mp4");
    let made = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-f", "lavfi", "-i"])
        .args([
            "testsrc=size=160x120:rate=10",
            "-t",
            "5",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(&clip)
        .status()
        .expect("ffmpeg is installed by scripts/setup");
    assert!(made.success());
    let port = free_port();
    let _server = Procs(vec![
        Command::new("ffmpeg")
            .args([
                "-nostdin",
                "-loglevel",
                "error",
                "-re",
                "-stream_loop",
                "-1",
                "-i",
            ])
            .arg(&clip)
            .args(["-f", "mpjpeg", "-listen", "1"])
            .arg(format!("http://127.0.0.1:{port}/cam.mjpg"))
            .spawn()
            .unwrap(),
    ]);
    let (up, kubectl) = up_with(&dir.path().join("up"), 1, &["--twin-interval", "1s"]);
    devices_served(&kubectl);
    let captured = dir
        .path()
        .join("up")
        .canonicalize()
        .unwrap()
        .join("captured");
    let camera = |name: &str, config: &str, format: &str, max: u32| {
        format!(
            r#"
apiVersion: sedna.io/v1alpha1
kind: Dataset
metadata: {{ name: {name}-frames }}
spec: {{ url: {}/{name}, format: {format}, nodeName: edge-1 }}
---
apiVersion: devices.sedna.io/v1beta1
kind: Device
metadata: {{ name: {name} }}
spec:
  deviceModelRef: {{ name: camera }}
  nodeName: edge-1
  protocol: {{ protocolName: camera, configData: {config} }}
  properties: [ {{ name: saveFrame }} ]
  capture: {{ dataset: {name}-frames, maxSamples: {max} }}
"#,
            captured.display()
        )
    };
    kubectl.apply(
        r#"
apiVersion: devices.sedna.io/v1beta1
kind: DeviceModel
metadata: { name: camera }
spec:
  protocol: camera
  properties: [ { name: saveFrame, type: STREAM } ]
"#,
    );
    kubectl.apply(&camera(
        "cam-http",
        &format!(
            "{{ url: \"http://127.0.0.1:{port}/cam.mjpg\", fps: 5, width: 28, height: 28, format: pgm }}"
        ),
        "dir",
        8,
    ));
    kubectl.apply(&camera(
        "cam-file",
        &format!("{{ url: \"{}\", fps: 4, format: jpg }}", clip.display()),
        "dir",
        100,
    ));
    // A camera cannot be captured into a CSV dataset: said, with the reason.
    kubectl.apply(&camera("cam-csv", "{ url: /nowhere.mp4 }", "csv", 10));

    // The stream's frames: 28x28 grey PGM files, the newest 8 kept, the deletions counted.
    wait_until("frames beyond the bound", Duration::from_secs(60), || {
        events_about(&kubectl, "cam-http")
            .contains("CaptureTrimmed")
            .then_some(())
    });
    let frames: Vec<_> = std::fs::read_dir(captured.join("cam-http"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!frames.is_empty() && frames.len() <= 8, "{frames:?}");
    for frame in &frames {
        let bytes = std::fs::read(frame).unwrap();
        assert!(bytes.starts_with(b"P5\n28 28\n255\n"), "{frame:?}");
        assert_eq!(bytes.len(), 13 + 28 * 28, "{frame:?}");
    }
    let d = wait_device(&kubectl, "cam-http", "online", |d| {
        state(d) == Some("online")
    });
    assert!(d["status"]["lastOnlineTime"].is_string(), "{d}");
    // The file camera: JPEG frames at the source's size.
    wait_until("JPEG frames from the file", Duration::from_secs(30), || {
        let n = std::fs::read_dir(captured.join("cam-file")).ok()?.count();
        (n >= 3).then_some(())
    });
    for entry in std::fs::read_dir(captured.join("cam-file")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(path.extension().is_some_and(|e| e == "jpg"), "{path:?}");
        assert!(
            bytes.starts_with(&[0xFF, 0xD8]) && bytes.ends_with(&[0xFF, 0xD9]),
            "{path:?}"
        );
    }
    wait_until("the frame count", Duration::from_secs(30), || {
        let n = samples(&kubectl, "cam-file-frames")?;
        (n >= 3).then_some(())
    });
    wait_until(
        "the refusal of a CSV dataset for frames",
        Duration::from_secs(30),
        || {
            events_about(&kubectl, "cam-csv")
                .contains("must have format dir")
                .then_some(())
        },
    );
    drop(up);
}

fn python(script: &str, args: &[&str], log: &std::path::Path) -> Child {
    Command::new(root().join(".venv/bin/python"))
        .arg(root().join(script))
        .args(args)
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("needs .venv with asyncua, grpcio and grpcio-tools (scripts/setup)")
}

fn read_log(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_users_mapper_serves_a_protocol_the_agent_lacks_through_the_mapper_interface() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (sensor_log, mapper_log) = (dir.path().join("sensor.log"), dir.path().join("mapper.log"));
    let mut procs = Procs(vec![python(
        "examples/devices/opcua_sensor.py",
        &["--port", &port.to_string()],
        &sensor_log,
    )]);
    let (_up, kubectl) = up_with(&dir.path().join("up"), 1, &["--twin-interval", "1s"]);
    devices_served(&kubectl);
    let socket = dir
        .path()
        .join("up/nodes/edge-1/mappers.sock")
        .display()
        .to_string();

    // The example as shipped, pointed at this test's OPC UA server.
    let example = std::fs::read_to_string(root().join("examples/devices/boiler.yaml"))
        .unwrap()
        .replace("127.0.0.1:4840", &format!("127.0.0.1:{port}"));
    kubectl.apply(&example);
    // No mapper serves opcua yet: the device waits, saying so.
    wait_until("the missing mapper said", Duration::from_secs(30), || {
        events_about(&kubectl, "boiler-1")
            .contains("no mapper serves protocol \"opcua\"")
            .then_some(())
    });
    assert_ne!(
        device(&kubectl, "boiler-1").as_ref().and_then(state),
        Some("online")
    );

    // The user's mapper registers: the device is handed to it at once (not at its next
    // back-off), its values reach the twin and its desired set point reaches the server.
    let mapper_args = ["--socket", socket.as_str()];
    procs.0.push(python(
        "examples/devices/mappers/opcua_mapper.py",
        &mapper_args,
        &mapper_log,
    ));
    let d = wait_device(&kubectl, "boiler-1", "the boiler's twins", |d| {
        state(d) == Some("online")
            && reported(d, "setpoint").as_deref() == Some("70.0")
            && reported(d, "temperature").is_some()
            && reported(d, "burner").is_some()
    });
    assert!(
        reported(&d, "temperature").unwrap().parse::<f64>().is_ok(),
        "{d}"
    );
    assert!(read_log(&sensor_log).contains("setpoint 70.0"));
    kubectl.ok(&[
        "patch",
        "device",
        "boiler-1",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/properties/1/desired/value","value":"55"}]"#,
    ]);
    wait_until(
        "the new set point on the server",
        Duration::from_secs(30),
        || {
            read_log(&sensor_log)
                .contains("setpoint 55.0")
                .then_some(())
        },
    );
    wait_device(&kubectl, "boiler-1", "the applied set point", |d| {
        reported(d, "setpoint").as_deref() == Some("55.0")
    });

    // A second mapper for the same protocol is refused, naming the one that serves it.
    let second = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("examples/devices/mappers/opcua_mapper.py"))
        .args(mapper_args)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains("ALREADY_EXISTS") && said.contains("served by mapper \"opcua-mapper\""),
        "{said}"
    );

    // The mapper crashes (SIGKILL): the device goes offline with the reason; a restarted
    // mapper gets it back.
    let mut mapper = procs.0.pop().unwrap();
    mapper.kill().unwrap();
    mapper.wait().unwrap();
    wait_device(&kubectl, "boiler-1", "offline after the crash", |d| {
        state(d) == Some("offline")
    });
    assert!(
        events_about(&kubectl, "boiler-1").contains("mapper \"opcua-mapper\" disconnected"),
        "{}",
        events_about(&kubectl, "boiler-1")
    );
    procs.0.push(python(
        "examples/devices/mappers/opcua_mapper.py",
        &mapper_args,
        &mapper_log,
    ));
    wait_device(&kubectl, "boiler-1", "online with the new mapper", |d| {
        state(d) == Some("online")
    });

    // The Device is deleted: its mapper is told to let it go, and does.
    kubectl.ok(&["delete", "device", "boiler-1"]);
    wait_until("the mapper to let go", Duration::from_secs(30), || {
        read_log(&mapper_log)
            .contains("stopped default/boiler-1")
            .then_some(())
    });
}

#[test]
fn an_edge_worker_takes_a_camera_device_as_its_input_by_name() {
    let dir = tempfile::tempdir().unwrap();
    // The camera: a lossless recording of 60 held-out MNIST digits.
    let frames = dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let images = std::fs::read(root().join("models/mnist/test-images.idx3-ubyte")).unwrap();
    for (i, pixels) in images[16..].chunks_exact(784).take(60).enumerate() {
        let mut pgm = b"P5\n28 28\n255\n".to_vec();
        pgm.extend_from_slice(pixels);
        std::fs::write(frames.join(format!("{i:04}.pgm")), pgm).unwrap();
    }
    let video = dir.path().join("digits.mkv");
    let made = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-framerate", "25", "-i"])
        .arg(frames.join("%04d.pgm"))
        .args(["-c:v", "ffv1", "-pix_fmt", "gray"])
        .arg(&video)
        .status()
        .expect("ffmpeg is installed by scripts/setup");
    assert!(made.success());
    let (_up, kubectl) = up_with(&dir.path().join("up"), 1, &["--twin-interval", "1s"]);
    devices_served(&kubectl);
    let models = root().join("models/mnist").canonicalize().unwrap();
    kubectl.apply(&format!(
        r#"
apiVersion: devices.sedna.io/v1beta1
kind: DeviceModel
metadata: {{ name: camera }}
spec: {{ protocol: camera, properties: [ {{ name: saveFrame, type: STREAM }} ] }}
---
apiVersion: devices.sedna.io/v1beta1
kind: Device
metadata: {{ name: digits-cam }}
spec:
  deviceModelRef: {{ name: camera }}
  nodeName: edge-1
  protocol: {{ protocolName: camera, configData: {{ url: "{video}", fps: 2 }} }}
---
apiVersion: sedna.io/v1alpha1
kind: Model
metadata: {{ name: mnist-edge }}
spec: {{ url: "{models}/edge/model.onnx", format: onnx }}
---
apiVersion: sedna.io/v1alpha1
kind: Model
metadata: {{ name: mnist-cloud }}
spec: {{ url: "{models}/cloud/model.onnx", format: onnx }}
---
apiVersion: sedna.io/v1alpha1
kind: JointInferenceService
metadata: {{ name: from-camera }}
spec:
  edgeWorker:
    model: {{ name: mnist-edge }}
    hardExampleMining: {{ name: EdgeOnly }}
    template:
      spec:
        nodeName: edge-1
        containers:
        - name: edge
          image: sedna-edge-worker
          env: [ {{ name: SEDNA_INPUT, value: "device:digits-cam" }}, {{ name: SEDNA_REPORT_INTERVAL_MS, value: "300" }} ]
  cloudWorker:
    model: {{ name: mnist-cloud }}
    template:
      spec:
        nodeSelector: {{ node-role.sedna.io/cloud: "" }}
        containers: [ {{ name: cloud, image: sedna-cloud-worker }} ]
"#,
        video = video.display(),
        models = models.display(),
    ));
    // The worker finds the camera's stream through the node's local API and answers every
    // frame of it.
    wait_until(
        "every frame of the camera answered",
        Duration::from_secs(120),
        || {
            let n = kubectl.ok(&[
                "get",
                "ji",
                "from-camera",
                "-o",
                "jsonpath={.status.inferences}",
            ]);
            (n.trim() == "60").then_some(())
        },
    );
    // The device itself is read by its mapper meanwhile.
    wait_device(&kubectl, "digits-cam", "the camera online", |d| {
        state(d) == Some("online")
    });
}
