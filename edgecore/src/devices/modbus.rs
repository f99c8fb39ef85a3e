//! The Modbus TCP mapper: polls each property's coil or registers at its collect cycle, turns
//! the words into a value (data type, byte and register order, scale and offset), and writes
//! desired values to holding registers and coils.

use std::collections::BTreeMap;
use std::time::Duration;

use sedna_api::devices::PropertyType;
use tokio::time::Instant;
use tokio_modbus::client::{Reader, Writer};

use super::spec::{DataType, MapperSpec, ModbusVisitor, PropertySpec, Protocol, Register, Visitor};
use super::{MapperError, MapperIo, Reading};

/// How long one request (or the connection) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Turns the words (or bits) read for a property into its value as text.
pub fn decode(v: &ModbusVisitor, type_: PropertyType, words: &[u16]) -> Result<String, String> {
    let need = usize::from(v.data_type.registers());
    if words.len() < need {
        return Err(format!("read {} registers, need {need}", words.len()));
    }
    let word = |i: usize| {
        if v.swap_bytes {
            words[i].swap_bytes()
        } else {
            words[i]
        }
    };
    let pair = || {
        let (hi, lo) = if v.swap_registers {
            (word(1), word(0))
        } else {
            (word(0), word(1))
        };
        (u32::from(hi) << 16) | u32::from(lo)
    };
    let raw = match v.data_type {
        DataType::Int16 => f64::from(word(0) as i16),
        DataType::Uint16 => f64::from(word(0)),
        DataType::Int32 => f64::from(pair() as i32),
        DataType::Uint32 => f64::from(pair()),
        DataType::Float32 => f64::from(f32::from_bits(pair())),
    };
    let value = raw * v.scale + v.value_offset;
    Ok(format_number(value, type_))
}

/// The text of a number as a property of `type_` reports it.
pub fn format_number(value: f64, type_: PropertyType) -> String {
    match type_ {
        PropertyType::Int => format!("{}", value.round() as i64),
        PropertyType::Boolean => (value != 0.0).to_string(),
        // Shortest text that reads back as the same f32: no float noise for FLOAT properties.
        PropertyType::Float => format!("{}", value as f32),
        _ => format!("{value}"),
    }
}

/// The register words that hold `text` for a property (the inverse of [`decode`]).
pub fn encode(v: &ModbusVisitor, text: &str) -> Result<Vec<u16>, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    let raw = (value - v.value_offset) / v.scale;
    let whole = |lo: f64, hi: f64| {
        let r = raw.round();
        if r.is_finite() && r >= lo && r <= hi {
            Ok(r)
        } else {
            Err(format!("{text} is out of range for {:?}", v.data_type))
        }
    };
    let bits: u32 = match v.data_type {
        DataType::Int16 => u32::from(whole(-32768.0, 32767.0)? as i16 as u16),
        DataType::Uint16 => whole(0.0, 65535.0)? as u32,
        DataType::Int32 => whole(-2_147_483_648.0, 2_147_483_647.0)? as i32 as u32,
        DataType::Uint32 => whole(0.0, 4_294_967_295.0)? as u32,
        DataType::Float32 => {
            let f = raw as f32;
            if !f.is_finite() {
                return Err(format!("{text} is out of range for float32"));
            }
            f.to_bits()
        }
    };
    let fix = |w: u16| if v.swap_bytes { w.swap_bytes() } else { w };
    Ok(if v.data_type.registers() == 1 {
        vec![fix(bits as u16)]
    } else {
        let (hi, lo) = (fix((bits >> 16) as u16), fix(bits as u16));
        if v.swap_registers {
            vec![lo, hi]
        } else {
            vec![hi, lo]
        }
    })
}

/// A coil's value from desired text.
pub fn parse_bit(text: &str) -> Result<bool, String> {
    match text.trim() {
        "true" | "1" | "on" | "ON" | "True" | "TRUE" => Ok(true),
        "false" | "0" | "off" | "OFF" | "False" | "FALSE" => Ok(false),
        other => Err(format!("{other:?} is not true or false")),
    }
}

fn unreachable(e: impl std::fmt::Display) -> MapperError {
    MapperError::Unreachable(e.to_string())
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, MapperError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Err(_) => Err(MapperError::Unreachable(format!(
            "{what}: no answer in {REQUEST_TIMEOUT:?}"
        ))),
        Ok(r) => r.map_err(|e| unreachable(format!("{what}: {e}"))),
    }
}

async fn read(
    ctx: &mut tokio_modbus::client::Context,
    p: &PropertySpec,
    v: &ModbusVisitor,
) -> Result<Result<String, String>, MapperError> {
    let what = format!("reading {}", p.name);
    let answer = match v.register {
        Register::Coil => timed(&what, ctx.read_coils(v.offset, 1))
            .await?
            .map(|bits| bits.iter().map(|&b| u16::from(b)).collect::<Vec<_>>()),
        Register::DiscreteInput => timed(&what, ctx.read_discrete_inputs(v.offset, 1))
            .await?
            .map(|bits| bits.iter().map(|&b| u16::from(b)).collect()),
        Register::Holding => {
            timed(
                &what,
                ctx.read_holding_registers(v.offset, v.data_type.registers()),
            )
            .await?
        }
        Register::Input => {
            timed(
                &what,
                ctx.read_input_registers(v.offset, v.data_type.registers()),
            )
            .await?
        }
    };
    Ok(match answer {
        Err(code) => Err(format!("the device answered {code:?}")),
        Ok(words) if matches!(v.register, Register::Coil | Register::DiscreteInput) => words
            .first()
            .map(|&b| format_number(f64::from(b), p.type_))
            .ok_or_else(|| "no bit in the answer".to_owned()),
        Ok(words) => decode(v, p.type_, &words),
    })
}

async fn write(
    ctx: &mut tokio_modbus::client::Context,
    p: &PropertySpec,
    v: &ModbusVisitor,
    text: &str,
) -> Result<Result<(), String>, MapperError> {
    let what = format!("writing {}", p.name);
    let answer = match v.register {
        Register::Coil => match parse_bit(text) {
            Err(e) => return Ok(Err(e)),
            Ok(bit) => timed(&what, ctx.write_single_coil(v.offset, bit)).await?,
        },
        Register::Holding => match encode(v, text) {
            Err(e) => return Ok(Err(e)),
            Ok(words) if words.len() == 1 => {
                timed(&what, ctx.write_single_register(v.offset, words[0])).await?
            }
            Ok(words) => timed(&what, ctx.write_multiple_registers(v.offset, &words)).await?,
        },
        _ => return Ok(Err("read-only table".into())),
    };
    Ok(answer.map_err(|code| format!("the device answered {code:?}")))
}

/// Runs the mapper until the connection fails (the manager restarts it) or the manager stops.
pub(crate) async fn run(spec: &MapperSpec, io: &mut MapperIo) -> Result<(), MapperError> {
    let Protocol::Modbus { address, slave } = spec.protocol else {
        return Err(MapperError::Unreachable("not a Modbus device".into()));
    };
    let mut ctx = timed(
        &format!("connecting to {address}"),
        tokio_modbus::client::tcp::connect_slave(address, tokio_modbus::Slave(slave)),
    )
    .await?;
    io.send(Reading::State("online")).await?;
    let properties: Vec<(&PropertySpec, &ModbusVisitor)> = spec
        .properties
        .iter()
        .filter_map(|p| match &p.visitor {
            Visitor::Modbus(v) => Some((p, v)),
            _ => None,
        })
        .collect();
    let mut next: Vec<Instant> = vec![Instant::now(); properties.len()];
    let mut applied: BTreeMap<String, String> = BTreeMap::new();
    let mut refused: BTreeMap<String, String> = BTreeMap::new();
    loop {
        // Desired values first: they are what someone is waiting for.
        let desired = io.desired.borrow_and_update().clone();
        for (p, v) in properties.iter().filter(|(p, _)| p.writable) {
            let Some(want) = desired.get(&p.name) else {
                continue;
            };
            if applied.get(&p.name) == Some(want) || refused.get(&p.name) == Some(want) {
                continue;
            }
            match write(&mut ctx, p, v, want).await? {
                Ok(()) => {
                    applied.insert(p.name.clone(), want.clone());
                    io.send(Reading::Applied {
                        property: p.name.clone(),
                        value: want.clone(),
                    })
                    .await?;
                    // Read it back at once.
                    if let Some(i) = properties.iter().position(|(q, _)| q.name == p.name) {
                        next[i] = Instant::now();
                    }
                }
                Err(why) => {
                    refused.insert(p.name.clone(), want.clone());
                    io.send(Reading::Failed {
                        property: p.name.clone(),
                        message: format!("desired value {want:?} not written: {why}"),
                    })
                    .await?;
                }
            }
        }
        let now = Instant::now();
        for (i, (p, v)) in properties.iter().enumerate() {
            if next[i] > now {
                continue;
            }
            next[i] = now + p.collect_cycle;
            match read(&mut ctx, p, v).await? {
                Ok(value) => {
                    io.send(Reading::Reported {
                        property: p.name.clone(),
                        value,
                    })
                    .await?
                }
                Err(why) => {
                    io.send(Reading::Failed {
                        property: p.name.clone(),
                        message: format!("not read: {why}"),
                    })
                    .await?
                }
            }
        }
        let wake = next
            .iter()
            .min()
            .copied()
            .unwrap_or(now + Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            changed = io.desired.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visitor(data_type: DataType) -> ModbusVisitor {
        ModbusVisitor {
            register: Register::Holding,
            offset: 0,
            data_type,
            scale: 1.0,
            value_offset: 0.0,
            swap_bytes: false,
            swap_registers: false,
        }
    }

    #[test]
    fn words_decode_per_type_order_scale_and_offset() {
        let mut v = visitor(DataType::Int16);
        assert_eq!(decode(&v, PropertyType::Int, &[0xFFFE]).unwrap(), "-2");
        v.data_type = DataType::Uint16;
        assert_eq!(decode(&v, PropertyType::Int, &[0xFFFE]).unwrap(), "65534");
        v.data_type = DataType::Int16;
        v.scale = 0.1;
        v.value_offset = -40.0;
        assert_eq!(decode(&v, PropertyType::Float, &[615]).unwrap(), "21.5");
        let mut f = visitor(DataType::Float32);
        let bits = 21.25f32.to_bits();
        let (hi, lo) = ((bits >> 16) as u16, bits as u16);
        assert_eq!(decode(&f, PropertyType::Float, &[hi, lo]).unwrap(), "21.25");
        f.swap_registers = true;
        assert_eq!(decode(&f, PropertyType::Float, &[lo, hi]).unwrap(), "21.25");
        f.swap_bytes = true;
        assert_eq!(
            decode(&f, PropertyType::Float, &[lo.swap_bytes(), hi.swap_bytes()]).unwrap(),
            "21.25"
        );
        let i = visitor(DataType::Int32);
        assert_eq!(
            decode(&i, PropertyType::Int, &[0xFFFF, 0xFFFF]).unwrap(),
            "-1"
        );
        assert!(
            decode(&i, PropertyType::Int, &[1])
                .unwrap_err()
                .contains("need 2")
        );
    }

    #[test]
    fn desired_values_encode_back_to_the_same_words_or_say_why_not() {
        for (data_type, text) in [
            (DataType::Int16, "-300"),
            (DataType::Uint16, "65000"),
            (DataType::Int32, "-100000"),
            (DataType::Uint32, "4000000000"),
            (DataType::Float32, "21.5"),
        ] {
            for (swap_bytes, swap_registers) in [(false, false), (true, true), (false, true)] {
                let mut v = visitor(data_type);
                v.swap_bytes = swap_bytes;
                v.swap_registers = swap_registers;
                let words = encode(&v, text).unwrap();
                let back = decode(&v, PropertyType::Double, &words).unwrap();
                assert_eq!(back.parse::<f64>().unwrap(), text.parse::<f64>().unwrap());
            }
        }
        let mut scaled = visitor(DataType::Int16);
        scaled.scale = 0.1;
        assert_eq!(encode(&scaled, "21.5").unwrap(), vec![215]);
        assert!(
            encode(&scaled, "5000")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            encode(&scaled, "warm")
                .unwrap_err()
                .contains("not a number")
        );
        assert!(
            encode(&visitor(DataType::Uint16), "-1")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(parse_bit("on").unwrap());
        assert!(parse_bit("maybe").is_err());
    }
}
