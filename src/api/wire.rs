//! The data path's connection to PostgreSQL: a small client of the extended query protocol
//! that sends a whole request — the tenant settings, a statement to prepare if the
//! connection has not seen it, the statement itself — as one write ending in one `Sync`.
//!
//! PostgreSQL runs every message before a `Sync` in one implicit transaction: settings made
//! with `set_config(…, true)` hold until that `Sync` and no further, and once a message fails
//! the server skips every later one up to the `Sync` — so a request whose settings fail
//! never runs its statement. A request, read or write, therefore costs one flight and two
//! statements; a write commits at the `Sync` (see [`super::tx`]).
//!
//! Message encoding and decoding, and the password exchanges (SCRAM-SHA-256, MD5,
//! cleartext), are `postgres-protocol`'s, the crate tokio-postgres is built on; parameters
//! are serialized by their `ToSql` implementations in binary; results come back as text.
//! No TLS, like the rest of the data path today.

use std::{fmt, io, time::Duration};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::{
    authentication::{
        md5_hash,
        sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256},
    },
    message::{backend::Message, frontend},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::{
    config::Host,
    types::{ToSql, Type},
};

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The server refused a message; the connection is still usable once its `Sync` has
    /// been answered.
    #[error("{0}")]
    Db(DbError),
    /// The socket failed or closed: the connection is gone.
    #[error("database connection: {0}")]
    Io(#[from] io::Error),
    /// The server sent what the protocol does not allow here, or a value could not be
    /// encoded or decoded: the connection is not reused.
    #[error("database protocol: {0}")]
    Protocol(String),
    /// A message longer than [`MAX_MESSAGE_BYTES`]: the connection is not reused.
    #[error("a result of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(usize),
}

impl WireError {
    /// The server's SQLSTATE, if the server refused a message.
    pub fn code(&self) -> Option<&str> {
        match self {
            WireError::Db(e) => Some(&e.code),
            _ => None,
        }
    }
}

/// An error the server reported (an `ErrorResponse`).
#[derive(Debug, Clone, Default)]
pub struct DbError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub constraint: Option<String>,
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.severity, self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

/// One row of results, every column as text (`None` for NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(Vec<Option<String>>);

impl Row {
    /// Column `i` as text; `None` when it is NULL or missing.
    pub fn text(&self, i: usize) -> Option<&str> {
        self.0.get(i).and_then(|v| v.as_deref())
    }

    /// Column `i` as a boolean (`t` or `f`).
    pub fn bool(&self, i: usize) -> Result<bool, WireError> {
        match self.text(i) {
            Some("t") => Ok(true),
            Some("f") => Ok(false),
            other => Err(WireError::Protocol(format!(
                "column {i}: expected a boolean, got {other:?}"
            ))),
        }
    }

    /// Column `i` as a non-NULL string.
    pub fn string(&self, i: usize) -> Result<String, WireError> {
        self.text(i)
            .map(str::to_string)
            .ok_or_else(|| WireError::Protocol(format!("column {i} is NULL")))
    }
}

/// One message of a pipeline.
pub enum Step<'a> {
    /// Deallocate a prepared statement.
    Close(&'a str),
    /// Prepare `sql` as statement `name`, its parameters of `types`.
    Parse {
        name: &'a str,
        sql: &'a str,
        types: &'a [Type],
    },
    /// Bind `params` (of `types`) to statement `statement` and run it to the end.
    Execute {
        statement: &'a str,
        params: &'a [&'a (dyn ToSql + Sync)],
        types: &'a [Type],
    },
}

impl<'a> Step<'a> {
    /// A statement without parameters, prepared unnamed and run: its `Parse` and `Execute`.
    pub fn unnamed(sql: &'a str) -> [Step<'a>; 2] {
        [
            Step::Parse {
                name: "",
                sql,
                types: &[],
            },
            Step::Execute {
                statement: "",
                params: &[],
                types: &[],
            },
        ]
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One session. Dropping it closes the socket; the server then ends the session and rolls
/// back whatever it had not committed.
pub struct WireConn {
    stream: Box<dyn Stream>,
    read: BytesMut,
    write: BytesMut,
    /// Set while an exchange is under way, and for good once one failed half-way: the
    /// session can no longer be trusted to be between transactions.
    broken: bool,
    /// Where the session's server listens and the key that cancels its running statement.
    cancel: Option<CancelToken>,
}

/// What it takes to cancel a session's running statement: a CancelRequest with the
/// session's process id and secret key, sent on a connection of its own.
#[derive(Debug, Clone)]
pub struct CancelToken {
    host: Host,
    port: u16,
    process_id: i32,
    secret_key: i32,
}

impl CancelToken {
    /// Asks the server to cancel whatever the session is running (best effort: the server
    /// answers nothing).
    pub async fn cancel(&self) -> io::Result<()> {
        let mut buf = BytesMut::new();
        frontend::cancel_request(self.process_id, self.secret_key, &mut buf);
        let send = async {
            match &self.host {
                Host::Tcp(h) => {
                    let mut s = tokio::net::TcpStream::connect((h.as_str(), self.port)).await?;
                    s.write_all(&buf).await?;
                    s.shutdown().await
                }
                Host::Unix(dir) => {
                    let mut s = tokio::net::UnixStream::connect(
                        dir.join(format!(".s.PGSQL.{}", self.port)),
                    )
                    .await?;
                    s.write_all(&buf).await?;
                    s.shutdown().await
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), send)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "cancel timed out"))?
    }
}

/// The largest message accepted from the server: a result row (a request's whole JSON
/// answer is one) beyond this fails the request and closes the connection, rather than
/// buffering whatever length the server announces.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

impl fmt::Debug for WireConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireConn")
            .field("broken", &self.broken)
            .finish()
    }
}

impl WireConn {
    /// Opens a session as `config` says (first host; TCP or Unix socket) with the startup
    /// parameters `params` besides user and database, and authenticates.
    pub async fn connect(
        config: &tokio_postgres::Config,
        params: &[(&str, &str)],
    ) -> Result<Self, WireError> {
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let host = config
            .get_hosts()
            .first()
            .cloned()
            .unwrap_or(Host::Tcp("localhost".into()));
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(30));
        let target = host.clone();
        let open = async {
            Ok::<Box<dyn Stream>, io::Error>(match host {
                Host::Tcp(h) => {
                    let s = tokio::net::TcpStream::connect((h.as_str(), port)).await?;
                    s.set_nodelay(true)?;
                    Box::new(s)
                }
                Host::Unix(dir) => Box::new(
                    tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?,
                ),
            })
        };
        let stream = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let mut conn = Self {
            stream,
            read: BytesMut::with_capacity(8192),
            write: BytesMut::with_capacity(8192),
            broken: false,
            cancel: None,
        };
        let user = config
            .get_user()
            .ok_or_else(|| WireError::Protocol("the database URL names no user".into()))?;
        let mut startup = vec![("user", user), ("client_encoding", "UTF8")];
        if let Some(db) = config.get_dbname() {
            startup.push(("database", db));
        }
        if let Some(app) = config.get_application_name() {
            startup.push(("application_name", app));
        }
        startup.extend_from_slice(params);
        frontend::startup_message(startup, &mut conn.write)?;
        let password = config.get_password().unwrap_or_default();
        let start = async {
            conn.send().await?;
            conn.authenticate(user.as_bytes(), password).await?;
            loop {
                match conn.next().await? {
                    Message::ReadyForQuery(_) => return Ok(()),
                    Message::ErrorResponse(body) => return Err(WireError::Db(db_error(&body)?)),
                    Message::BackendKeyData(k) => {
                        conn.cancel = Some(CancelToken {
                            host: target.clone(),
                            port,
                            process_id: k.process_id(),
                            secret_key: k.secret_key(),
                        })
                    }
                    _ => {}
                }
            }
        };
        // The whole start-up (TCP, authentication, first ReadyForQuery) within the timeout.
        tokio::time::timeout(timeout, start)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "start-up timed out"))??;
        Ok(conn)
    }

    /// What cancels this session's running statement, once the server has said.
    pub fn cancel_token(&self) -> Option<CancelToken> {
        self.cancel.clone()
    }

    async fn authenticate(&mut self, user: &[u8], password: &[u8]) -> Result<(), WireError> {
        let mut scram: Option<ScramSha256> = None;
        let mut scram_done = false;
        loop {
            match self.next().await? {
                // A server that began SCRAM must prove it knows the password before it is
                // trusted (its final message), or anyone on the path could pose as it.
                Message::AuthenticationOk if scram.is_some() && !scram_done => {
                    return Err(WireError::Protocol(
                        "the server skipped SCRAM's final message".into(),
                    ))
                }
                Message::AuthenticationOk => return Ok(()),
                // Without TLS, a cleartext password would cross the network as is: the
                // gateway's password can act as every tenant.
                Message::AuthenticationCleartextPassword => {
                    return Err(WireError::Protocol(
                        "the server asks for the password in cleartext over a connection without TLS; configure scram-sha-256 (or md5) for the gateway role".into(),
                    ))
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(user, password, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = false;
                    while let Some(m) = mechanisms.next()? {
                        offered |= m == SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(WireError::Protocol(
                            "the server offers no SASL mechanism this client supports".into(),
                        ));
                    }
                    let s = ScramSha256::new(password, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.write)?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| WireError::Protocol("SASL out of order".into()))?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut self.write)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    scram
                        .as_mut()
                        .ok_or_else(|| WireError::Protocol("SASL out of order".into()))?
                        .finish(body.data())?;
                    scram_done = true;
                    continue;
                }
                Message::ErrorResponse(body) => return Err(WireError::Db(db_error(&body)?)),
                _ => {
                    return Err(WireError::Protocol(
                        "the server asks for an authentication method this client does not support"
                            .into(),
                    ))
                }
            }
            self.send().await?;
        }
    }

    /// Whether the session is gone, cannot be trusted (an exchange was interrupted or broke
    /// the protocol).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Runs `steps` as one implicit transaction ended by `Sync`: committed if every step
    /// succeeded, rolled back otherwise (the steps after a failed one do not run). Returns
    /// the rows of the last `Execute`.
    pub async fn sync(&mut self, steps: &[Step<'_>]) -> Result<Vec<Row>, WireError> {
        self.begin()?;
        let out = async {
            self.encode(steps)?;
            frontend::sync(&mut self.write);
            self.send().await?;
            let out = self.answers(steps).await?;
            // A commit can fail at the `Sync` itself (a deferred constraint): the error
            // arrives between the last answer and ReadyForQuery, and the transaction is
            // rolled back.
            let commit = self.ready().await?;
            match (out, commit) {
                (Ok(rows), None) => Ok(rows),
                (Ok(_), Some(e)) | (Err(e), _) => Err(WireError::Db(e)),
            }
        }
        .await;
        self.settle(out)
    }

    /// Marks the session untrusted for the length of an exchange: if the exchange's future
    /// is dropped half-way, it stays so and the connection is never reused.
    fn begin(&mut self) -> Result<(), WireError> {
        if self.broken {
            return Err(
                io::Error::new(io::ErrorKind::NotConnected, "connection not reusable").into(),
            );
        }
        self.broken = true;
        Ok(())
    }

    /// The session is clean again after an exchange that ended with the server's answer
    /// (success or a server error), not after a socket or protocol failure.
    fn settle<T>(&mut self, out: Result<T, WireError>) -> Result<T, WireError> {
        self.broken = !matches!(out, Ok(_) | Err(WireError::Db(_)));
        out
    }

    fn encode(&mut self, steps: &[Step<'_>]) -> Result<(), WireError> {
        for step in steps {
            match step {
                Step::Close(name) => frontend::close(b'S', name, &mut self.write)?,
                Step::Parse { name, sql, types } => {
                    frontend::parse(name, sql, types.iter().map(Type::oid), &mut self.write)?
                }
                Step::Execute {
                    statement,
                    params,
                    types,
                } => {
                    if params.len() != types.len() {
                        return Err(WireError::Protocol("parameters and types differ".into()));
                    }
                    let bound = frontend::bind(
                        "",
                        statement,
                        params.iter().map(|_| 1),
                        params.iter().zip(types.iter()),
                        |(p, ty), buf| {
                            p.to_sql_checked(ty, buf).map(|n| match n {
                                tokio_postgres::types::IsNull::Yes => {
                                    postgres_protocol::IsNull::Yes
                                }
                                tokio_postgres::types::IsNull::No => postgres_protocol::IsNull::No,
                            })
                        },
                        [0],
                        &mut self.write,
                    );
                    match bound {
                        Ok(()) => {}
                        Err(frontend::BindError::Conversion(e)) => {
                            return Err(WireError::Protocol(format!("parameter: {e}")))
                        }
                        Err(frontend::BindError::Serialization(e)) => return Err(e.into()),
                    }
                    frontend::execute("", 0, &mut self.write)?;
                }
            }
        }
        Ok(())
    }

    /// Reads the answers to `steps` up to the last one or the first error; the outer
    /// `Result` is the session's, the inner one the server's verdict.
    async fn answers(
        &mut self,
        steps: &[Step<'_>],
    ) -> Result<Result<Vec<Row>, DbError>, WireError> {
        let mut rows = Vec::new();
        for step in steps {
            let want_first = match step {
                Step::Close(_) => b'3',
                Step::Parse { .. } => b'1',
                Step::Execute { .. } => b'2',
            };
            match self.next().await? {
                Message::ErrorResponse(body) => return Ok(Err(db_error(&body)?)),
                m if tag(&m) == want_first => {}
                other => return Err(unexpected(&other)),
            }
            if let Step::Execute { .. } = step {
                rows.clear();
                loop {
                    match self.next().await? {
                        Message::DataRow(body) => rows.push(decode_row(&body)?),
                        Message::CommandComplete(_) | Message::EmptyQueryResponse => break,
                        Message::ErrorResponse(body) => return Ok(Err(db_error(&body)?)),
                        other => return Err(unexpected(&other)),
                    }
                }
            }
        }
        Ok(Ok(rows))
    }

    /// Reads up to ReadyForQuery, which must say idle; returns the error the server sent
    /// before it, if any (a failed commit).
    async fn ready(&mut self) -> Result<Option<DbError>, WireError> {
        let mut failed = None;
        loop {
            match self.next().await? {
                Message::ErrorResponse(body) if failed.is_none() => {
                    failed = Some(db_error(&body)?);
                }
                Message::ReadyForQuery(body) if body.status() == b'I' => return Ok(failed),
                Message::ReadyForQuery(body) => return Err(left_in(body.status())),
                other => return Err(unexpected(&other)),
            }
        }
    }

    async fn send(&mut self) -> io::Result<()> {
        let out = self.write.split();
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// The next message that is not a notice, a notification or a parameter report.
    async fn next(&mut self) -> Result<Message, WireError> {
        loop {
            if let Some(h) = postgres_protocol::message::backend::Header::parse(&self.read)? {
                if h.len() as usize > MAX_MESSAGE_BYTES {
                    return Err(WireError::TooLarge(h.len() as usize));
                }
            }
            match Message::parse(&mut self.read)? {
                Some(
                    Message::NoticeResponse(_)
                    | Message::NotificationResponse(_)
                    | Message::ParameterStatus(_),
                ) => continue,
                Some(m) => return Ok(m),
                None => {
                    self.read.reserve(8192);
                    if self.stream.read_buf(&mut self.read).await? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the server closed the connection",
                        )
                        .into());
                    }
                }
            }
        }
    }
}

fn tag(m: &Message) -> u8 {
    match m {
        Message::ParseComplete => b'1',
        Message::BindComplete => b'2',
        Message::CloseComplete => b'3',
        _ => 0,
    }
}

fn left_in(status: u8) -> WireError {
    WireError::Protocol(format!(
        "session left in transaction state {:?}",
        status as char
    ))
}

fn unexpected(m: &Message) -> WireError {
    let name = match m {
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::DataRow(_) => "DataRow",
        Message::CommandComplete(_) => "CommandComplete",
        Message::RowDescription(_) => "RowDescription",
        Message::NoData => "NoData",
        Message::PortalSuspended => "PortalSuspended",
        Message::CopyInResponse(_) | Message::CopyOutResponse(_) => "Copy",
        _ => "another message",
    };
    WireError::Protocol(format!("unexpected {name} from the server"))
}

fn decode_row(body: &postgres_protocol::message::backend::DataRowBody) -> Result<Row, WireError> {
    let buf = body.buffer();
    let mut ranges = body.ranges();
    let mut out = Vec::new();
    while let Some(r) = ranges.next()? {
        // Lossy: bytes a SQL_ASCII database let through fail no request and break no
        // connection.
        out.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
    }
    Ok(Row(out))
}

fn db_error(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> Result<DbError, WireError> {
    let mut e = DbError::default();
    let mut fields = body.fields();
    while let Some(f) = fields.next()? {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => e.severity = v,
            b'S' if e.severity.is_empty() => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'n' => e.constraint = Some(v),
            _ => {}
        }
    }
    Ok(e)
}
