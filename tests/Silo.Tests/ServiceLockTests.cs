using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Time.Testing;
using Npgsql;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Storage;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Silo.Tests;

/// <summary>
/// Silos without Redis are clusters of one: two of them, or one beside a Redis cluster, must not serve one service from
/// one database.
/// </summary>
[Collection(ServersCollection.Name)]
public sealed class ServiceLockTests(ServersFixture servers)
{
    [Fact]
    public async Task SecondLockOfAService_WaitsForTheFirst_AndRefusesWhileItIsHeld_OtherServicesAreApart()
    {
        await using var database = new IdempotencyDatabase(await servers.Postgres.CreateDatabaseAsync());
        await using var first = Lock(database, "orders", TimeSpan.FromSeconds(60));
        await using var impatient = Lock(database, "orders", TimeSpan.FromSeconds(2));
        await using var patient = Lock(database, "orders", TimeSpan.FromSeconds(60));
        await using var otherService = Lock(database, "payments", TimeSpan.FromSeconds(2));
        await first.AcquireAsync(CancellationToken.None);

        await otherService.AcquireAsync(CancellationToken.None);
        var refused = await Assert.ThrowsAsync<InvalidOperationException>(() => impatient.AcquireAsync(CancellationToken.None));
        var waiting = patient.AcquireAsync(CancellationToken.None);
        await Task.Delay(TimeSpan.FromSeconds(1.5));
        Assert.False(waiting.IsCompleted);
        await first.ReleaseAsync();
        await waiting.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.Contains("ConnectionStrings__Redis", refused.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task LockWaitedFor_OutlastsItsSessionLost_AndIsTakenOnceFree()
    {
        // A PostgreSQL restart while a starting silo waits for the lock ends its session: it waits on in a new one.
        var connectionString = await servers.Postgres.CreateDatabaseAsync();
        await using var database = new IdempotencyDatabase(connectionString);
        await using var first = Lock(database, "orders", TimeSpan.FromSeconds(60));
        await using var waiter = Lock(database, "orders", TimeSpan.FromSeconds(60));
        await first.AcquireAsync(CancellationToken.None);
        var holder = await LockHolderAsync(connectionString);
        var waiting = waiter.AcquireAsync(CancellationToken.None);
        var waiterSession = await WaitingSessionAsync(connectionString, holder);

        await EndLockSessionAsync(connectionString, waiterSession);
        await Task.Delay(TimeSpan.FromSeconds(1.5));
        Assert.False(waiting.IsCompleted, "The waiter stopped waiting when its session ended.");
        await first.ReleaseAsync();
        await waiting.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.NotEqual(waiterSession, await LockHolderAsync(connectionString));
    }

    [Fact]
    public async Task SilosOfARedisCluster_ShareTheLock_AndASiloWithoutRedisIsRefusedBesideThem_AndTheyBesideIt()
    {
        await using var database = new IdempotencyDatabase(await servers.Postgres.CreateDatabaseAsync());
        await using var clusteredA = Lock(database, "orders", TimeSpan.FromSeconds(2), clustered: true);
        await using var clusteredB = Lock(database, "orders", TimeSpan.FromSeconds(2), clustered: true);
        await using var standalone = Lock(database, "orders", TimeSpan.FromSeconds(2));
        await using var lateClustered = Lock(database, "orders", TimeSpan.FromSeconds(2), clustered: true);

        await clusteredA.AcquireAsync(CancellationToken.None);
        await clusteredB.AcquireAsync(CancellationToken.None);
        var standaloneRefused = await Assert.ThrowsAsync<InvalidOperationException>(() => standalone.AcquireAsync(CancellationToken.None));
        await clusteredA.ReleaseAsync();
        await clusteredB.ReleaseAsync();
        await standalone.AcquireAsync(CancellationToken.None);
        var clusteredRefused = await Assert.ThrowsAsync<InvalidOperationException>(() => lateClustered.AcquireAsync(CancellationToken.None));

        Assert.Contains("without Redis, would be a cluster of its own", standaloneRefused.Message, StringComparison.Ordinal);
        Assert.Contains("A silo without Redis serves 'orders'", clusteredRefused.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task SiloOfARedisCluster_HoldsTheServiceLockShared()
    {
        var settings = await TestClusterSettings.CreateAsync(servers);
        await using var silo = await TestSilo.StartAsync(settings);

        Assert.Equal(["ShareLock"], await AdvisoryLockModesAsync(settings["ConnectionStrings:Postgres"]!));
    }

    [Fact]
    public async Task SecondSiloOnPostgresWithoutRedis_StartsOnlyOnceTheFirstHasStopped()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        var first = await TestSilo.StartAsync(settings);
        Task<TestSilo>? second = null;
        try
        {
            Assert.Equal(1L, await AdvisoryLocksAsync(settings));
            second = TestSilo.StartAsync(settings);
            await Task.Delay(TimeSpan.FromSeconds(3));
            Assert.False(second.IsCompleted, "A second silo without Redis started beside the first on one database.");
        }
        finally
        {
            await first.DisposeAsync();
        }

        await using var started = await second.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal(IdempotencyStatus.None, (await started.Grains.GetIdempotencyGrain(new IdempotencyKey("alice", "k")).GetAsync()).Status);
        Assert.Equal(1L, await AdvisoryLocksAsync(settings));
    }

    [Fact]
    public async Task SiloWithoutRedis_StartedWhilePostgresIsDown_WaitsForIt()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await servers.Postgres.StopAsync();
        Task<TestSilo> starting;
        try
        {
            starting = TestSilo.StartAsync(settings);
            await Task.Delay(TimeSpan.FromSeconds(3));
        }
        finally
        {
            await servers.Postgres.StartAgainAsync();
        }

        await using var started = await starting.WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(1L, await AdvisoryLocksAsync(settings));
    }

    [Fact]
    public async Task LockLostWithItsSession_IsTakenAgainAtTheNextCheck_OrTheLossIsReportedWhenAnotherSiloTookIt()
    {
        await using var running = await RunningLock.StartAsync(servers, clustered: false);

        // PostgreSQL ends the lock's session, as a restart does: at its next check the silo holds the lock again.
        var first = await EndLockSessionAsync(running.ConnectionString);
        await UntilAsync(running.Clock, async () => await LockHolderAsync(running.ConnectionString) is { } pid && pid != first && running.HeldAgain);

        // Lost again, and another silo without Redis starts in between: the running one says two clusters serve it.
        await AssertTakenByASiloWithoutRedisIsReportedAsync(running);
    }

    [Fact]
    public async Task ClusterSilosLockLostWithItsSession_IsTakenAgainSharedBesideItsClusterMate_OrTheLossIsReportedWhenASiloWithoutRedisTookIt()
    {
        await using var running = await RunningLock.StartAsync(servers, clustered: true);
        var runningSession = await LockHolderAsync(running.ConnectionString) ?? throw new InvalidOperationException("The lock is not held.");
        await using var mate = Lock(running.Database, "orders", TimeSpan.FromSeconds(2), clustered: true);
        await mate.AcquireAsync(CancellationToken.None);

        // PostgreSQL ends the running silo's session: at its next check it shares the lock with its mate again, quietly.
        await EndLockSessionAsync(running.ConnectionString, runningSession);
        await UntilAsync(running.Clock, async () => await AdvisoryLockModesAsync(running.ConnectionString) is ["ShareLock", "ShareLock"] && running.HeldAgain);
        Assert.DoesNotContain(running.Log.Collector.GetSnapshot(), r => r.Level == LogLevel.Error);

        // The mate stops, the session is lost again, and a silo without Redis starts in between: two clusters serve it.
        await mate.DisposeAsync();
        await UntilAsync(running.Clock, async () => (await AdvisoryLockHoldersAsync(running.ConnectionString)).Count == 1);
        await AssertTakenByASiloWithoutRedisIsReportedAsync(running);
    }

    // The running lock's session ends, a silo without Redis takes the lock, and at its next check the running one says
    // that two clusters serve the service, naming the other's session, and leaves the lock to it.
    private static async Task AssertTakenByASiloWithoutRedisIsReportedAsync(RunningLock running)
    {
        // A check the clock's last step set going runs first: run after the session ended, it would take the lock again.
        await Task.Delay(TimeSpan.FromMilliseconds(500));
        await EndLockSessionAsync(running.ConnectionString);
        await using var standalone = Lock(running.Database, "orders", TimeSpan.FromSeconds(10));
        await standalone.AcquireAsync(CancellationToken.None);
        await UntilAsync(running.Clock, () => Task.FromResult(running.Log.Collector.GetSnapshot().Any(r => r.Level == LogLevel.Error)));
        var error = running.Log.Collector.GetSnapshot().Single(r => r.Level == LogLevel.Error).Message;
        Assert.Contains("two clusters", error, StringComparison.Ordinal);
        Assert.Contains($"session {await LockHolderAsync(running.ConnectionString)}", error, StringComparison.Ordinal);
        Assert.Equal(["ExclusiveLock"], await AdvisoryLockModesAsync(running.ConnectionString));
    }

    // Ends the session that holds the database's advisory lock (or the given one of several), as PostgreSQL's restart
    // would; returns its pid once gone.
    private static async Task<int> EndLockSessionAsync(string connectionString, int? session = null)
    {
        var pid = session ?? await LockHolderAsync(connectionString) ?? throw new InvalidOperationException("Nobody holds the lock.");
        await using var connection = new NpgsqlConnection(connectionString + ";Pooling=false");
        await connection.OpenAsync();
        await using (var end = new NpgsqlCommand("SELECT pg_terminate_backend(@pid)", connection))
        {
            end.Parameters.AddWithValue("pid", pid);
            await end.ExecuteScalarAsync();
        }

        for (var waited = 0; (await AdvisoryLockHoldersAsync(connectionString)).Contains(pid); waited += 50)
        {
            Assert.True(waited < 10_000, "The lock's session did not end.");
            await Task.Delay(50);
        }

        return pid;
    }

    // The session, other than the holder's, that a lock waiting to be taken asks in (its pid): the one asking for it.
    private static async Task<int> WaitingSessionAsync(string connectionString, int? holder)
    {
        for (var waited = 0; ; waited += 50)
        {
            await using (var connection = new NpgsqlConnection(connectionString + ";Pooling=false"))
            {
                await connection.OpenAsync();
                await using var find = new NpgsqlCommand(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> @holder " +
                    "AND query LIKE '%pg_try_advisory_lock%'", connection);
                find.Parameters.AddWithValue("holder", holder ?? 0);
                if (await find.ExecuteScalarAsync() is int pid)
                {
                    return pid;
                }
            }

            Assert.True(waited < 10_000, "No session asked for the lock.");
            await Task.Delay(50);
        }
    }

    private static async Task<int?> LockHolderAsync(string connectionString) =>
        (await AdvisoryLockHoldersAsync(connectionString)) is [var pid] ? pid : null;

    // Moves the silo's clock a check at a time until the condition holds.
    private static async Task UntilAsync(FakeTimeProvider clock, Func<Task<bool>> condition)
    {
        for (var checks = 0; !await condition(); checks++)
        {
            Assert.True(checks < 100, "The condition never held.");
            clock.Advance(TimeSpan.FromSeconds(10));
            await Task.Delay(100);
        }
    }

    private static async Task<long> AdvisoryLocksAsync(Dictionary<string, string?> settings) =>
        (await AdvisoryLockHoldersAsync(settings["ConnectionStrings:Postgres"]!)).Count;

    // The sessions holding an advisory lock in the database.
    private static async Task<List<int>> AdvisoryLockHoldersAsync(string connectionString) =>
        [.. (await AdvisoryLockRowsAsync(connectionString)).Select(l => l.Pid)];

    // How each advisory lock in the database is held (ShareLock, ExclusiveLock).
    private static async Task<List<string>> AdvisoryLockModesAsync(string connectionString) =>
        [.. (await AdvisoryLockRowsAsync(connectionString)).Select(l => l.Mode)];

    private static async Task<List<(int Pid, string Mode)>> AdvisoryLockRowsAsync(string connectionString)
    {
        await using var connection = new NpgsqlConnection(connectionString + ";Pooling=false");
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand(
            "SELECT pid, mode FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())", connection);
        await using var reader = await command.ExecuteReaderAsync();
        var locks = new List<(int, string)>();
        while (await reader.ReadAsync())
        {
            locks.Add((reader.GetInt32(0), reader.GetString(1)));
        }

        return locks;
    }

    private static ServiceLock Lock(IdempotencyDatabase database, string service, TimeSpan timeout, bool clustered = false) =>
        new(database, service, clustered, TimeProvider.System, NullLogger<ServiceLock>.Instance) { StartupTimeout = timeout };

    /// <summary>A running silo's lock of service "orders" in a database of its own, on a fake clock, checked every 10 s.</summary>
    private sealed class RunningLock : IAsyncDisposable
    {
        private RunningLock(string connectionString, bool clustered)
        {
            ConnectionString = connectionString;
            Database = new IdempotencyDatabase(connectionString);
            Lock = new ServiceLock(Database, "orders", clustered, Clock, Log) { CheckInterval = TimeSpan.FromSeconds(10) };
        }

        public string ConnectionString { get; }

        public IdempotencyDatabase Database { get; }

        public FakeTimeProvider Clock { get; } = new(DateTimeOffset.UtcNow);

        public FakeLogger<ServiceLock> Log { get; } = new();

        public ServiceLock Lock { get; }

        /// <summary>True once the lock said it holds the lock again after losing it.</summary>
        public bool HeldAgain => Log.Collector.GetSnapshot().Any(r => r.Level == LogLevel.Information && r.Message.Contains("held again", StringComparison.Ordinal));

        public static async Task<RunningLock> StartAsync(ServersFixture servers, bool clustered)
        {
            var running = new RunningLock(await servers.Postgres.CreateDatabaseAsync(), clustered);
            await running.Lock.AcquireAsync(CancellationToken.None);
            return running;
        }

        public async ValueTask DisposeAsync()
        {
            await Lock.DisposeAsync();
            await Database.DisposeAsync();
        }
    }
}
