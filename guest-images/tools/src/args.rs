//! The command line of `stasis-vsock`, parsed into a [`Command`].

use std::fmt;

/// The well-known CID of the host (`VMADDR_CID_HOST`).
pub const CID_HOST: u32 = 2;
/// The CID of the local machine (`VMADDR_CID_LOCAL`), for loopback.
pub const CID_LOCAL: u32 = 1;
/// `VMADDR_PORT_ANY`: no valid port to connect to or listen on.
const PORT_ANY: u32 = u32::MAX;

pub const USAGE: &str = "\
Usage: stasis-vsock connect CID PORT
       stasis-vsock listen PORT [--once | --count N]
       stasis-vsock --help

Pipes stdin to an AF_VSOCK stream connection and the connection to stdout,
until both directions have ended. When stdin ends, the sending side of the
connection is shut down (the peer reads end-of-file); the program exits when
the peer has ended its side too.

  connect CID PORT   connect to PORT on CID (a number, or `host` for 2,
                     `local` for 1)
  listen PORT        accept a connection to PORT from any CID and pipe it;
                     --once (the default) serves one connection, --count N
                     serves N one after the other (0: no limit). stdin is
                     read once: connections after its end get end-of-file
                     at once.

Exit status: 0 when every connection ended cleanly, 1 on an error (one line
on stderr), 2 on a bad command line.";

/// What to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Help,
    Connect {
        cid: u32,
        port: u32,
    },
    /// `count`: connections to serve; `None` for no limit.
    Listen {
        port: u32,
        count: Option<u64>,
    },
}

/// A bad command line, said in one sentence.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn usage_error(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    if args
        .iter()
        .any(|a| a == "-h" || a == "--help" || a == "help")
    {
        return Ok(Command::Help);
    }
    let (verb, rest) = args
        .split_first()
        .ok_or_else(|| usage_error("no command given (connect or listen)"))?;
    match verb.as_str() {
        "connect" => match rest {
            [cid, port] => Ok(Command::Connect {
                cid: parse_cid(cid)?,
                port: parse_port(port)?,
            }),
            _ => Err(usage_error("connect takes CID and PORT")),
        },
        "listen" => parse_listen(rest),
        other => Err(usage_error(format!(
            "unknown command '{other}' (connect or listen)"
        ))),
    }
}

fn parse_listen(rest: &[String]) -> Result<Command, UsageError> {
    let mut port = None;
    let mut count = Some(1);
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--once" => count = Some(1),
            "--count" => {
                let n = it
                    .next()
                    .ok_or_else(|| usage_error("--count needs a number"))?;
                count = parse_count(n)?;
            }
            s if s.starts_with("--count=") => count = parse_count(&s["--count=".len()..])?,
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(usage_error(format!("unknown option '{s}'")))
            }
            s if port.is_none() => port = Some(parse_port(s)?),
            s => return Err(usage_error(format!("unexpected argument '{s}'"))),
        }
    }
    let port = port.ok_or_else(|| usage_error("listen takes a PORT"))?;
    Ok(Command::Listen { port, count })
}

fn parse_count(s: &str) -> Result<Option<u64>, UsageError> {
    match s.parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(usage_error(format!(
            "bad count '{s}': expected a whole number (0: no limit)"
        ))),
    }
}

/// A CID: a decimal number below 2^32 - 1 (VMADDR_CID_ANY is no peer), or
/// `host` / `local`.
pub fn parse_cid(s: &str) -> Result<u32, UsageError> {
    match s {
        "host" => return Ok(CID_HOST),
        "local" => return Ok(CID_LOCAL),
        _ => {}
    }
    match s.parse::<u32>() {
        Ok(cid) if cid != u32::MAX => Ok(cid),
        _ => Err(usage_error(format!(
            "bad CID '{s}': expected a number from 0 to 4294967294, host or local"
        ))),
    }
}

/// A port: a decimal number below 2^32 - 1 (VMADDR_PORT_ANY).
pub fn parse_port(s: &str) -> Result<u32, UsageError> {
    match s.parse::<u32>() {
        Ok(port) if port != PORT_ANY => Ok(port),
        _ => Err(usage_error(format!(
            "bad port '{s}': expected a number from 0 to 4294967294"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(args: &[&str]) -> String {
        match parse(args) {
            Err(e) => e.to_string(),
            Ok(c) => panic!("{args:?} parsed as {c:?}"),
        }
    }

    #[test]
    fn connect_takes_a_numeric_cid_and_port() {
        assert_eq!(
            parse(["connect", "3", "5000"]),
            Ok(Command::Connect { cid: 3, port: 5000 })
        );
    }

    #[test]
    fn connect_knows_host_and_local() {
        assert_eq!(
            parse(["connect", "host", "1"]),
            Ok(Command::Connect { cid: 2, port: 1 })
        );
        assert_eq!(
            parse(["connect", "local", "1"]),
            Ok(Command::Connect { cid: 1, port: 1 })
        );
    }

    #[test]
    fn bad_cid_is_named() {
        assert_eq!(
            err(&["connect", "two", "5000"]),
            "bad CID 'two': expected a number from 0 to 4294967294, host or local"
        );
        assert!(err(&["connect", "-1", "5000"]).starts_with("bad CID '-1'"));
        assert!(err(&["connect", "4294967295", "5000"]).starts_with("bad CID"));
        assert!(err(&["connect", "4294967296", "5000"]).starts_with("bad CID"));
    }

    #[test]
    fn bad_port_is_named() {
        assert_eq!(
            err(&["connect", "2", "50x"]),
            "bad port '50x': expected a number from 0 to 4294967294"
        );
        assert!(err(&["connect", "2", ""]).starts_with("bad port ''"));
        assert!(err(&["listen", "4294967295"]).starts_with("bad port"));
    }

    #[test]
    fn connect_needs_exactly_two_arguments() {
        assert_eq!(err(&["connect", "2"]), "connect takes CID and PORT");
        assert_eq!(
            err(&["connect", "2", "3", "4"]),
            "connect takes CID and PORT"
        );
    }

    #[test]
    fn listen_serves_one_connection_by_default() {
        assert_eq!(
            parse(["listen", "5000"]),
            Ok(Command::Listen {
                port: 5000,
                count: Some(1)
            })
        );
        assert_eq!(
            parse(["listen", "--once", "5000"]),
            Ok(Command::Listen {
                port: 5000,
                count: Some(1)
            })
        );
    }

    #[test]
    fn listen_count_zero_means_no_limit() {
        assert_eq!(
            parse(["listen", "5000", "--count", "3"]),
            Ok(Command::Listen {
                port: 5000,
                count: Some(3)
            })
        );
        assert_eq!(
            parse(["listen", "5000", "--count=0"]),
            Ok(Command::Listen {
                port: 5000,
                count: None
            })
        );
        assert!(err(&["listen", "5000", "--count"]).contains("--count needs"));
        assert!(err(&["listen", "5000", "--count", "x"]).starts_with("bad count 'x'"));
    }

    #[test]
    fn listen_rejects_unknown_options_and_extra_arguments() {
        assert_eq!(
            err(&["listen", "5000", "--forever"]),
            "unknown option '--forever'"
        );
        assert_eq!(
            err(&["listen", "5000", "6000"]),
            "unexpected argument '6000'"
        );
        assert_eq!(err(&["listen"]), "listen takes a PORT");
    }

    #[test]
    fn no_or_unknown_command_is_an_error() {
        assert_eq!(err(&[]), "no command given (connect or listen)");
        assert_eq!(err(&["send"]), "unknown command 'send' (connect or listen)");
    }

    #[test]
    fn help_anywhere_wins() {
        assert_eq!(parse(["--help"]), Ok(Command::Help));
        assert_eq!(parse(["connect", "-h"]), Ok(Command::Help));
    }
}
