using System.Globalization;
using System.Text;
using Npgsql;

namespace OrleansIdempotency.Testing;

/// <summary>
/// A real PostgreSQL server on a free loopback port and a Unix socket, in a fresh data directory, run as the
/// <c>postgres</c> user when the tests run as root (PostgreSQL refuses root). It can be stopped, crashed and started
/// again on the same data.
/// </summary>
public sealed class PostgresServer : IAsyncDisposable
{
    private readonly string binDirectory;
    private readonly string dataDirectory;
    private readonly bool durable;
    private ServerProcess? process;

    private PostgresServer(string binDirectory, string dataDirectory, int port, bool durable)
    {
        this.binDirectory = binDirectory;
        this.dataDirectory = dataDirectory;
        this.durable = durable;
        Port = port;
    }

    /// <summary>The loopback port the server listens on.</summary>
    public int Port { get; }

    /// <summary>The data directory's parent, which the server's user owns: it holds the server's Unix socket.</summary>
    private string RootDirectory => Path.GetDirectoryName(dataDirectory)!;

    /// <summary>The postmaster's id and its children's (the backends, WAL writer, checkpointer, ...).</summary>
    public IReadOnlyList<int> ProcessIds => process is null ? [] : [process.Id, .. ProcessCpu.ChildrenOf(process.Id)];

    /// <summary>Connection string for the <c>postgres</c> database.</summary>
    public string ConnectionString => ConnectionStringFor("postgres");

    /// <summary>Starts a new server. <paramref name="durable"/> keeps fsync on, for benchmarks and crash tests that need it.</summary>
    public static async Task<PostgresServer> StartAsync(bool durable = false)
    {
        var bin = FindBinDirectory();
        // Short, because the server's Unix socket lives here and a socket path may not exceed 107 bytes.
        var root = Path.Combine(Path.GetTempPath(), "oipg-" + Guid.NewGuid().ToString("N")[..12]);
        if (Encoding.UTF8.GetByteCount(Path.Combine(root, ".s.PGSQL.65535")) > 107 || root.Contains(',', StringComparison.Ordinal))
        {
            throw new InvalidOperationException($"The temp directory {Path.GetTempPath()} is too long (or has a comma) for a PostgreSQL Unix socket; set TMPDIR to a short path.");
        }

        var data = Path.Combine(root, "data");
        Directory.CreateDirectory(root);
        ChildProcesses.TrackDirectory(root);
        try
        {
            if (Environment.UserName == "root")
            {
                await RunAsync("chown", ["postgres:postgres", root]);
            }

            // Run from a directory the postgres user owns, not the test's own (a clone may sit under a private home).
            var initdb = ServerProcess.RunAs("postgres", Path.Combine(bin, "initdb"),
                ["-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "--locale=C"]);
            initdb.WorkingDirectory = root;
            await RunAsync(initdb);

            return await FreePort.StartOnOneAsync(port => new PostgresServer(bin, data, port, durable), server => server.StartAgainAsync(), server => server.StopAsync());
        }
        catch
        {
            try
            {
                Directory.Delete(root, recursive: true);
            }
            catch (IOException)
            {
                // The start's failure is the one to report.
            }

            throw;
        }
    }

    /// <summary>
    /// <paramref name="connectionString"/> (one of this server's) through the server's Unix socket instead of TCP, as
    /// an application on the database's own host would connect.
    /// </summary>
    public string OverUnixSocket(string connectionString) =>
        new NpgsqlConnectionStringBuilder(connectionString) { Host = RootDirectory }.ConnectionString;

    /// <summary>Connection string for <paramref name="database"/>.</summary>
    public string ConnectionStringFor(string database) =>
        $"Host=127.0.0.1;Port={Port.ToString(CultureInfo.InvariantCulture)};Username=postgres;Database={database};" +
        "Timeout=5;Command Timeout=10;Include Error Detail=true";

    /// <summary>Creates an empty database and returns its connection string.</summary>
    public async Task<string> CreateDatabaseAsync(string? name = null)
    {
        name ??= "test_" + Guid.NewGuid().ToString("N");
        // Unpooled: a pooled connection may predate a restart of the server.
        await using var connection = new NpgsqlConnection(ConnectionString + ";Pooling=false");
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand($"CREATE DATABASE \"{name}\"", connection);
        await command.ExecuteNonQueryAsync();
        return ConnectionStringFor(name);
    }

    /// <summary>Starts the server (again) on its data directory and port, and waits until it accepts connections.</summary>
    public async Task StartAgainAsync()
    {
        // After a crash the old backends notice their postmaster is gone and exit within moments; until they have,
        // the new postmaster refuses to start on the shared memory they hold.
        for (var attempt = 1; ; attempt++)
        {
            try
            {
                await StartOnceAsync();
                return;
            }
            catch (InvalidOperationException) when (attempt < 10 && process is { HasExited: true })
            {
                await Task.Delay(500);
            }
        }
    }

    private async Task StartOnceAsync()
    {
        // Durable is how production runs: every commit flushed, and shared buffers that hold a million records and
        // their indexes (a quarter of this machine's memory would be 6 GB). The rest is for fast tests.
        string[] settings = durable
            ? ["-c", "shared_buffers=1GB"]
            : ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "shared_buffers=128MB"];
        process = ServerProcess.Start(Path.Combine(binDirectory, "postgres"),
            [
                "-D", dataDirectory, "-p", Port.ToString(CultureInfo.InvariantCulture),
                "-c", "listen_addresses=127.0.0.1", "-c", $"unix_socket_directories={RootDirectory}", "-c", "max_connections=300",
                .. settings,
            ],
            user: "postgres",
            workingDirectory: RootDirectory);
        await WaitUntilReadyAsync(TimeSpan.FromSeconds(30));
    }

    /// <summary>
    /// Freezes the server (SIGSTOP to every one of its processes), as a stalled VM or a disk that stopped answering
    /// does: its connections stay open and nothing answers, until <see cref="Thaw"/>.
    /// </summary>
    public void Freeze() => process?.SignalTree(19);

    /// <summary>SIGCONT to every process of the server.</summary>
    public void Thaw() => process?.SignalTree(18);

    /// <summary>A fast shutdown (SIGINT): clients are disconnected and the server exits cleanly.</summary>
    public Task StopAsync() => SignalAndWaitAsync(2);

    /// <summary>A crash (SIGKILL of the postmaster): the next start recovers from the write-ahead log.</summary>
    public Task KillAsync() => SignalAndWaitAsync(9);

    public async ValueTask DisposeAsync()
    {
        // A frozen server would not act on its shutdown signal.
        Thaw();
        await StopAsync();
        try
        {
            Directory.Delete(RootDirectory, recursive: true);
        }
        catch (IOException)
        {
            // Left for the OS to clean; it is under the temp directory.
        }
    }

    private async Task SignalAndWaitAsync(int signal)
    {
        if (process is not null)
        {
            await process.SignalAndWaitAsync(signal, TimeSpan.FromSeconds(30));
            process = null;
        }
    }

    private async Task WaitUntilReadyAsync(TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            if (process!.HasExited)
            {
                throw new InvalidOperationException($"PostgreSQL exited while starting:\n{process.Output}");
            }

            try
            {
                await using var connection = new NpgsqlConnection(ConnectionString + ";Pooling=false");
                await connection.OpenAsync();
                return;
            }
            catch (NpgsqlException) when (DateTime.UtcNow < deadline)
            {
                await Task.Delay(100);
            }
        }
    }

    private static string FindBinDirectory()
    {
        var configured = Environment.GetEnvironmentVariable("POSTGRES_BIN");
        if (!string.IsNullOrEmpty(configured))
        {
            return configured;
        }

        var versions = Directory.Exists("/usr/lib/postgresql")
            ? Directory.GetDirectories("/usr/lib/postgresql").OrderByDescending(d => int.TryParse(Path.GetFileName(d), out var v) ? v : 0)
            : Enumerable.Empty<string>();
        return versions.Select(v => Path.Combine(v, "bin")).FirstOrDefault(d => File.Exists(Path.Combine(d, "postgres")))
            ?? throw new InvalidOperationException("No PostgreSQL server found under /usr/lib/postgresql; set POSTGRES_BIN, or run scripts/test.sh, which installs it.");
    }

    private static Task RunAsync(string fileName, IEnumerable<string> arguments, bool allowFailure = false) =>
        RunAsync(ServerProcess.RunAs(null, fileName, arguments), allowFailure);

    private static async Task RunAsync(System.Diagnostics.ProcessStartInfo start, bool allowFailure = false)
    {
        start.RedirectStandardOutput = true;
        start.RedirectStandardError = true;
        using var process = System.Diagnostics.Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        await process.WaitForExitAsync();
        if (process.ExitCode != 0 && !allowFailure)
        {
            throw new InvalidOperationException($"{start.FileName} {string.Join(' ', start.ArgumentList)} failed ({process.ExitCode}):\n{await stdout}\n{await stderr}");
        }
    }
}
