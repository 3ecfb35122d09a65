using OrleansIdempotency.Testing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Options;
using Microsoft.Extensions.Time.Testing;
using Npgsql;
using OrleansIdempotency.Grains;
using Orleans.Storage;
using OrleansIdempotency.Silo.Storage;

namespace OrleansIdempotency.Silo.Tests;

[Collection(ServersCollection.Name)]
public sealed class PostgresStorageTests(ServersFixture servers)
{
    private static readonly byte[] Request = [4, 2];
    private static readonly StoredResponse Created = new(201, [new("Location", "/orders/7")], "{\"id\":7}"u8.ToArray(), false, 8);

    private static ClaimRequest Claim(TimeSpan? retention = null, Guid? attempt = null) =>
        new(attempt ?? Guid.NewGuid(), Request, TimeSpan.FromMinutes(1), retention ?? TimeSpan.FromHours(1));

    private static IdempotencyKey NewKey() => new("alice", Guid.NewGuid().ToString("N"));

    [Fact]
    public async Task Schema_IsAppliedRepeatedlyAndConcurrently_WithoutError()
    {
        var connectionString = await servers.Postgres.CreateDatabaseAsync();
        await using var database = new IdempotencyDatabase(connectionString);
        var installers = Enumerable.Range(0, 4)
            .Select(_ => new PostgresSchemaInstaller(database, TimeProvider.System, NullLogger<PostgresSchemaInstaller>.Instance))
            .ToArray();

        await Task.WhenAll(installers.Select(i => i.InstallAsync(CancellationToken.None)));
        await Task.WhenAll(installers.Select(i => i.InstallAsync(CancellationToken.None)));

        await using var command = database.DataSource.CreateCommand("SELECT count(*) FROM OrleansQuery");
        Assert.Equal(4L, await command.ExecuteScalarAsync());
    }

    [Fact]
    public async Task SchemaInstall_WhoseSessionTheServerEnds_IsTriedAgain_NotTheSilosEnd()
    {
        // A server shutting down (or an administrator) ends each session with 57P01: a silo starting during a
        // PostgreSQL restart waits it out, as it waits for a server not yet up.
        var connectionString = await servers.Postgres.CreateDatabaseAsync();
        await using var database = new IdempotencyDatabase(connectionString);
        var log = new FakeLogger<PostgresSchemaInstaller>();
        var installer = new PostgresSchemaInstaller(database, TimeProvider.System, log);
        await using var holder = new NpgsqlConnection(connectionString);
        await holder.OpenAsync();
        await using (var take = new NpgsqlCommand("SELECT pg_advisory_lock(@key)", holder))
        {
            take.Parameters.AddWithValue("key", PostgresSchemaInstaller.AdvisoryLockKey);
            await take.ExecuteNonQueryAsync();
        }

        var install = installer.InstallAsync(CancellationToken.None);
        await using (var end = new NpgsqlCommand(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid <> pg_backend_pid()", holder))
        {
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
            while ((long)(await end.ExecuteScalarAsync())! == 0)
            {
                Assert.True(DateTime.UtcNow < deadline, "The installer never waited on its lock.");
                await Task.Delay(20);
            }
        }

        await using (var release = new NpgsqlCommand("SELECT pg_advisory_unlock(@key)", holder))
        {
            release.Parameters.AddWithValue("key", PostgresSchemaInstaller.AdvisoryLockKey);
            await release.ExecuteNonQueryAsync();
        }

        await install.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Contains(log.Collector.GetSnapshot(), r => r.Message.Contains("57P01", StringComparison.Ordinal));
        await using var command = database.DataSource.CreateCommand("SELECT count(*) FROM OrleansQuery");
        Assert.True((long)(await command.ExecuteScalarAsync())! > 0);
    }

    [Fact]
    public async Task SchemaAppliedAgainWhileAVacuumHoldsTheTable_DoesNotWaitForIt()
    {
        // Had it waited, every write of every silo would have queued behind its lock request until the vacuum ended.
        var connectionString = await servers.Postgres.CreateDatabaseAsync();
        await using var database = new IdempotencyDatabase(connectionString);
        var installer = new PostgresSchemaInstaller(database, TimeProvider.System, NullLogger<PostgresSchemaInstaller>.Instance);
        await installer.InstallAsync(CancellationToken.None);
        await using var vacuum = new NpgsqlConnection(connectionString);
        await vacuum.OpenAsync();
        await using var transaction = await vacuum.BeginTransactionAsync();
        await using (var take = new NpgsqlCommand("LOCK TABLE OrleansStorage IN SHARE UPDATE EXCLUSIVE MODE", vacuum, transaction))
        {
            await take.ExecuteNonQueryAsync();
        }

        var again = installer.InstallAsync(CancellationToken.None);
        var finished = await Task.WhenAny(again, Task.Delay(TimeSpan.FromSeconds(15))) == again;
        await transaction.RollbackAsync();

        Assert.True(finished, "the installer waited for the vacuum's lock");
        await again;
    }

    [Fact]
    public async Task Schema_RefusesADatabaseThatHoldsAnotherApplicationsOrleansQueries()
    {
        var connectionString = await servers.Postgres.CreateDatabaseAsync();
        await using var database = new IdempotencyDatabase(connectionString);
        await using (var foreign = database.DataSource.CreateCommand(
            "CREATE TABLE OrleansQuery (QueryKey varchar(64) PRIMARY KEY, QueryText varchar(8000) NOT NULL);" +
            "INSERT INTO OrleansQuery VALUES ('WriteToStorageKey', 'select * from WriteToStorage(@GrainIdHash)');"))
        {
            await foreign.ExecuteNonQueryAsync();
        }

        var installer = new PostgresSchemaInstaller(database, TimeProvider.System, NullLogger<PostgresSchemaInstaller>.Instance);
        var error = await Assert.ThrowsAsync<InvalidOperationException>(() => installer.InstallAsync(CancellationToken.None));

        Assert.Contains("database of its own", error.Message, StringComparison.Ordinal);
        await using var unchanged = database.DataSource.CreateCommand("SELECT QueryText FROM OrleansQuery WHERE QueryKey = 'WriteToStorageKey'");
        Assert.Equal("select * from WriteToStorage(@GrainIdHash)", await unchanged.ExecuteScalarAsync());
    }

    [Fact]
    public async Task SchemaOfANewerVersion_IsLeftAsItIs_ByAnOlderSiloStarting_WhileAnOlderOneIsReplaced()
    {
        // A rolling upgrade, or its rollback: an older silo restarting must not put its functions back under the newer
        // silos running beside it (the database's functions are shared; silos read them on every write).
        var connectionString = await servers.Postgres.CreateDatabaseAsync();
        await using var database = new IdempotencyDatabase(connectionString);
        var log = new FakeLogger<PostgresSchemaInstaller>();
        var installer = new PostgresSchemaInstaller(database, TimeProvider.System, log);
        await installer.InstallAsync(CancellationToken.None);
        var installed = await ScalarAsync<string>(database, "SELECT QueryText FROM OrleansQuery WHERE QueryKey = 'WriteToStorageKey'");
        var version = PostgresSchemaInstaller.Version;
        Assert.Contains($"/* OrleansIdempotency schema {version} */", installed, StringComparison.Ordinal);

        await ExecuteAsync(database,
            $"UPDATE OrleansQuery SET QueryText = replace(QueryText, 'schema {version} ', 'schema {version + 1} ') WHERE QueryKey = 'WriteToStorageKey';" +
            "CREATE OR REPLACE FUNCTION OrleansStorage_PayloadValidStill(payload bytea) RETURNS boolean LANGUAGE sql AS $$ SELECT true /* newer */ $$;");
        await installer.InstallAsync(CancellationToken.None);

        Assert.Contains($"schema {version + 1} ", await ScalarAsync<string>(database, "SELECT QueryText FROM OrleansQuery WHERE QueryKey = 'WriteToStorageKey'"), StringComparison.Ordinal);
        Assert.Contains("newer", await ScalarAsync<string>(database, "SELECT prosrc FROM pg_proc WHERE proname = 'orleansstorage_payloadvalidstill'"), StringComparison.Ordinal);
        Assert.Contains(log.Collector.GetSnapshot(), r => r.Level == LogLevel.Warning && r.Message.Contains($"newer version ({version + 1})", StringComparison.Ordinal));

        // One written before versions were (its marker alone), or of an older version: replaced.
        await ExecuteAsync(database,
            $"UPDATE OrleansQuery SET QueryText = replace(QueryText, 'schema {version + 1} ', '') WHERE QueryKey = 'WriteToStorageKey';");
        await installer.InstallAsync(CancellationToken.None);

        Assert.Equal(installed, await ScalarAsync<string>(database, "SELECT QueryText FROM OrleansQuery WHERE QueryKey = 'WriteToStorageKey'"));
        Assert.DoesNotContain("newer", await ScalarAsync<string>(database, "SELECT prosrc FROM pg_proc WHERE proname = 'orleansstorage_payloadvalidstill'"), StringComparison.Ordinal);
    }

    [Fact]
    public async Task Start_WarnsWhenRecordsCommitWithoutWaitingForDurability()
    {
        // synchronous_commit off acknowledges a claim before it is on disk: a crash of PostgreSQL takes it back; local
        // beside a synchronous standby, before the standby has it. (The tests' server runs with fsync off, which the
        // start warns of too, so this asks a durable one.)
        await using var durable = await PostgresServer.StartAsync(durable: true);
        var connectionString = await durable.CreateDatabaseAsync();
        async Task<bool> WarnedAsync(string options)
        {
            await using var database = new IdempotencyDatabase(new NpgsqlConnectionStringBuilder(connectionString) { Options = options, CommandTimeout = 60 }.ConnectionString);
            var log = new FakeLogger<PostgresSchemaInstaller>();
            await new PostgresSchemaInstaller(database, TimeProvider.System, log).InstallAsync(CancellationToken.None);
            return log.Collector.GetSnapshot().Any(r => r.Level == LogLevel.Warning && r.Message.Contains("before they are durable", StringComparison.Ordinal));
        }

        Assert.False(await WarnedAsync(""));
        Assert.True(await WarnedAsync("-c synchronous_commit=off"));
        Assert.False(await WarnedAsync("-c synchronous_commit=local"));

        // A standby named (none runs, so only commits that do not wait for it, local ones, may be made from here on).
        await using (var system = new NpgsqlConnection(new NpgsqlConnectionStringBuilder(connectionString) { Options = "-c synchronous_commit=local" }.ConnectionString))
        {
            await system.OpenAsync();
            await using var name = new NpgsqlCommand("ALTER SYSTEM SET synchronous_standby_names = 'standby'; SELECT pg_reload_conf();", system);
            await name.ExecuteNonQueryAsync();
        }

        // The server reloads its configuration when it gets to it: new sessions see the standby named from then on.
        for (var waited = 0; await ScalarAsync(durable.ConnectionString, "SHOW synchronous_standby_names") != "standby"; waited += 50)
        {
            Assert.True(waited < 10_000, "The server did not reload its configuration.");
            await Task.Delay(50);
        }

        Assert.True(await WarnedAsync("-c synchronous_commit=local"));
    }

    [Fact]
    public async Task Start_WarnsWhenAStandbyIsReplicatedAsynchronously_AndSaysSoWhereItsUserCannotTell()
    {
        // A standby streaming asynchronously may lack the last claims and completions the primary acknowledged: promoted,
        // it loses them, and their keys run again. A physical replication connection streaming from the server is one.
        await using var durable = await PostgresServer.StartAsync(durable: true);
        var connectionString = await durable.CreateDatabaseAsync();
        // A user of its own database, without pg_read_all_stats: it sees a walsender, not whether it is synchronous.
        await using (var admin = new NpgsqlConnection(durable.ConnectionString))
        {
            await admin.OpenAsync();
            await using var create = new NpgsqlCommand("CREATE ROLE silo LOGIN", admin);
            await create.ExecuteNonQueryAsync();
            create.CommandText = "CREATE DATABASE silo_records OWNER silo";
            await create.ExecuteNonQueryAsync();
        }

        var unprivileged = new NpgsqlConnectionStringBuilder(durable.ConnectionString) { Username = "silo", Database = "silo_records" }.ConnectionString;
        static async Task<bool> LoggedAsync(string connectionString, LogLevel level, string text)
        {
            await using var database = new IdempotencyDatabase(connectionString);
            var log = new FakeLogger<PostgresSchemaInstaller>();
            await new PostgresSchemaInstaller(database, TimeProvider.System, log).InstallAsync(CancellationToken.None);
            return log.Collector.GetSnapshot().Any(r => r.Level == level && r.Message.Contains(text, StringComparison.Ordinal));
        }

        Task<bool> WarnedAsync() => LoggedAsync(connectionString, LogLevel.Warning, "asynchronously");
        Assert.False(await WarnedAsync());
        Assert.False(await LoggedAsync(unprivileged, LogLevel.Information, "may not read"));

        using var stop = new CancellationTokenSource();
        await using var standby = new Npgsql.Replication.PhysicalReplicationConnection(durable.ConnectionString);
        await standby.Open();
        var system = await standby.IdentifySystem();
        var streaming = Task.Run(async () =>
        {
            await foreach (var _ in standby.StartReplication(system.XLogPos, stop.Token))
            {
            }
        });
        try
        {
            for (var waited = 0; await ScalarAsync(durable.ConnectionString, "SELECT count(*)::text FROM pg_stat_replication WHERE state = 'streaming'") != "1"; waited += 50)
            {
                Assert.True(waited < 10_000, "The replication connection never streamed.");
                await Task.Delay(50);
            }

            Assert.True(await WarnedAsync());
            Assert.True(await LoggedAsync(unprivileged, LogLevel.Information, "may not read"));
            Assert.False(await LoggedAsync(unprivileged, LogLevel.Warning, "asynchronously"));
        }
        finally
        {
            await stop.CancelAsync();
            await Assert.ThrowsAnyAsync<OperationCanceledException>(() => streaming);
        }
    }

    // Whether a session waits for a lock on the records' table (the maintenance transaction holds it). Read from the
    // lock table, which is read afresh each time, not from pg_stat_activity, which a transaction sees as first read.
    private static async Task<bool> WaitsOnALockAsync(NpgsqlConnection connection, NpgsqlTransaction transaction)
    {
        await using var command = new NpgsqlCommand(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = 'orleansstorage'::regclass AND NOT granted)", connection, transaction);
        return (bool)(await command.ExecuteScalarAsync())!;
    }

    private static async Task<string?> ScalarAsync(string connectionString, string sql)
    {
        await using var connection = new NpgsqlConnection(connectionString + ";Pooling=false");
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand(sql, connection);
        return (string?)await command.ExecuteScalarAsync();
    }

    private static async Task<T> ScalarAsync<T>(IdempotencyDatabase database, string sql)
    {
        await using var command = database.DataSource.CreateCommand(sql);
        return (T)(await command.ExecuteScalarAsync())!;
    }

    private static async Task ExecuteAsync(IdempotencyDatabase database, string sql)
    {
        await using var command = database.DataSource.CreateCommand(sql);
        await command.ExecuteNonQueryAsync();
    }

    [Fact]
    public async Task CompletedKey_ReplaysAfterDeactivationAndAfterAFullClusterRestart()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        var key = NewKey();
        await using (var silo = await TestSilo.StartAsync(settings))
        {
            var grain = silo.Grains.GetIdempotencyGrain(key);
            var claim = await grain.ClaimAsync(Claim());
            Assert.True(await grain.CompleteAsync(claim.Token!.Value, Created));

            var management = silo.Grains.GetGrain<IManagementGrain>(0);
            await management.ForceActivationCollection(TimeSpan.Zero);
            Assert.Equal(0, await management.GetGrainActivationCount((GrainReference)grain));

            AssertReplays(await grain.ClaimAsync(Claim()));
        }

        await using (var restarted = await TestSilo.StartAsync(settings))
        {
            AssertReplays(await restarted.Grains.GetIdempotencyGrain(key).ClaimAsync(Claim()));
        }
    }

    [Fact]
    public async Task ThroughPostgresUnixSocket_KeysAreClaimedStoredAndReplayedAfterARestart()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        settings["ConnectionStrings:Postgres"] = servers.Postgres.OverUnixSocket(settings["ConnectionStrings:Postgres"]!);
        var key = NewKey();
        await using (var silo = await TestSilo.StartAsync(settings))
        {
            var grain = silo.Grains.GetIdempotencyGrain(key);
            var claim = await grain.ClaimAsync(Claim());
            Assert.True(await grain.CompleteAsync(claim.Token!.Value, Created));

            // The silo's own connections to this database, seen from a TCP connection: a Unix-socket backend has no
            // client address. None over TCP means the silo did not fall back to it.
            var (viaSocket, viaTcp) = await SiloBackendsAsync(new NpgsqlConnectionStringBuilder(settings["ConnectionStrings:Postgres"]!).Database!);
            Assert.True(viaSocket > 0);
            Assert.Equal(0, viaTcp);
        }

        await using (var restarted = await TestSilo.StartAsync(settings))
        {
            AssertReplays(await restarted.Grains.GetIdempotencyGrain(key).ClaimAsync(Claim()));
        }
    }

    private async Task<(long ViaSocket, long ViaTcp)> SiloBackendsAsync(string database)
    {
        await using var connection = new NpgsqlConnection(servers.Postgres.ConnectionString + ";Pooling=false");
        await connection.OpenAsync();
        await using var count = new NpgsqlCommand(
            "SELECT count(*) FILTER (WHERE client_addr IS NULL), count(*) FILTER (WHERE client_addr IS NOT NULL) " +
            "FROM pg_stat_activity WHERE datname = @database AND backend_type = 'client backend'", connection);
        count.Parameters.AddWithValue("database", database);
        await using var reader = await count.ExecuteReaderAsync();
        await reader.ReadAsync();
        return (reader.GetInt64(0), reader.GetInt64(1));
    }

    [Fact]
    public async Task SecondActivationOfTheSameKey_LosesTheETagCheck_AndIsNotGivenTheClaim()
    {
        // Two clusters on one database: each hosts its own activation of every key, as two activations can briefly
        // coexist while membership changes. Only the conditional write stands between them. (Through Redis: silos
        // without it refuse to share a database, ServiceLock.)
        await using var clusters = await TwoClusters.StartAsync(servers);
        var (settings, first, second) = (clusters.Settings, clusters.First, clusters.Second);

        for (var round = 0; round < 20; round++)
        {
            var key = NewKey();
            var a = first.Grains.GetIdempotencyGrain(key);
            var b = second.Grains.GetIdempotencyGrain(key);
            // Both activations know the key as absent before either claims: in even rounds they read it, in odd rounds
            // they have never read it and each writes its claim as a create.
            if (round % 2 == 0)
            {
                Assert.Equal(IdempotencyStatus.None, (await a.GetAsync()).Status);
                Assert.Equal(IdempotencyStatus.None, (await b.GetAsync()).Status);
            }

            var results = await Task.WhenAll(a.ClaimAsync(Claim()), b.ClaimAsync(Claim()));
            var firstVersion = await VersionAsync(settings, key);

            Assert.Single(results, r => r.Outcome == ClaimOutcome.Acquired);
            Assert.Single(results, r => r.Outcome == ClaimOutcome.InProgress);
            var (winner, loser) = results[0].Outcome == ClaimOutcome.Acquired ? (a, b) : (b, a);
            var token = results.Single(r => r.Outcome == ClaimOutcome.Acquired).Token!.Value;

            // The loser cannot complete with a token of its own making; the holder's completion goes through either
            // activation: through the stale one, its write is fenced, it re-reads, and finds the completion is there.
            Assert.False(await loser.CompleteAsync(token with { AttemptId = Guid.NewGuid() }, Created));
            Assert.True(await winner.CompleteAsync(token, Created));
            Assert.True(await loser.CompleteAsync(token, Created));
            AssertReplays(await loser.ClaimAsync(Claim()));
            AssertReplays(await winner.ClaimAsync(Claim()));
            Assert.Equal(1, await VersionAsync(settings, key) - firstVersion);
        }
    }

    [Fact]
    public async Task SecondActivation_ThatSawTheKeyInProgress_AnswersItsDuplicatesWithTheReplay_SoonAfterTheOtherCompletedIt()
    {
        // As while membership changes: two activations of one key, one of which holds a copy saying "in progress".
        await using var clusters = await TwoClusters.StartAsync(servers);
        var (first, second) = (clusters.First, clusters.Second);
        var key = NewKey();
        var holder = first.Grains.GetIdempotencyGrain(key);
        var stale = second.Grains.GetIdempotencyGrain(key);
        var held = await holder.ClaimAsync(Claim());
        Assert.Equal(ClaimOutcome.InProgress, (await stale.ClaimAsync(Claim())).Outcome);

        Assert.True(await holder.CompleteAsync(held.Token!.Value, Created));
        var answeredBy = DateTime.UtcNow + TimeSpan.FromSeconds(5);
        ClaimResult duplicate;
        do
        {
            // A duplicate waiting on the stale activation, as the layer's waiting duplicates do.
            await stale.WaitAsync(TimeSpan.FromSeconds(1));
            duplicate = await stale.ClaimAsync(Claim());
        }
        while (duplicate.Outcome == ClaimOutcome.InProgress && DateTime.UtcNow < answeredBy);

        // Without reading again, it would say "in progress" until the one-minute lease lapsed.
        AssertReplays(duplicate);
    }

    [Fact]
    public async Task SecondActivation_ThatFoundTheKeyInDoubt_ReplaysItSoonAfterAnOperatorResolvedItThroughTheOther()
    {
        await using var clusters = await TwoClusters.StartAsync(servers);
        var (first, second) = (clusters.First, clusters.Second);
        var key = NewKey();
        var resolving = first.Grains.GetIdempotencyGrain(key);
        var stale = second.Grains.GetIdempotencyGrain(key);
        await resolving.ClaimAsync(new ClaimRequest(Guid.NewGuid(), Request, TimeSpan.FromSeconds(1), TimeSpan.FromHours(1)));
        await Task.Delay(TimeSpan.FromSeconds(1.2));
        Assert.Equal(ClaimOutcome.OutcomeUnknown, (await stale.ClaimAsync(Claim())).Outcome);

        Assert.Equal(ResolveOutcome.Settled, await resolving.ResolveAsync(Created, null));
        var answeredBy = DateTime.UtcNow + TimeSpan.FromSeconds(5);
        ClaimResult retry;
        do
        {
            await Task.Delay(TimeSpan.FromMilliseconds(200));
            retry = await stale.ClaimAsync(Claim());
        }
        while (retry.Outcome == ClaimOutcome.OutcomeUnknown && DateTime.UtcNow < answeredBy);

        // Without reading again, it would refuse the key as long as its activation lived.
        AssertReplays(retry);
    }

    [Fact]
    public async Task ClaimReachingTheStoreAfterItsLeaseEnded_IsRefused_AndTheKeyStaysFree()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await using var silo = await TestSilo.StartAsync(settings);
        var storage = silo.Host.Services.GetRequiredKeyedService<IGrainStorage>(IdempotencyGrain.StorageName);
        var key = NewKey();
        var grainId = ((GrainReference)silo.Grains.GetIdempotencyGrain(key)).GrainId;
        var now = DateTimeOffset.UtcNow;
        IdempotencyRecord Claimed(TimeSpan leaseLeft) => new()
        {
            Status = IdempotencyStatus.InProgress, Fingerprint = Request, AttemptId = Guid.NewGuid(), FencingToken = 1,
            LeaseExpiresAt = now + leaseLeft, CreatedAt = now, ExpiresAt = now + TimeSpan.FromHours(1), Retention = TimeSpan.FromHours(1),
        };

        // A claim whose lease is over by the time it lands (it waited out a partition): refused, nothing stored.
        var late = new GrainState<IdempotencyRecord>(Claimed(TimeSpan.FromSeconds(-1)));
        await Assert.ThrowsAsync<InconsistentStateException>(() => storage.WriteStateAsync(IdempotencyGrain.StateName, grainId, late));
        var read = new GrainState<IdempotencyRecord>();
        await storage.ReadStateAsync(IdempotencyGrain.StateName, grainId, read);
        Assert.False(read.RecordExists);

        // On time: stored. A late claim over it (a renewal or re-claim that waited too long) is refused as well.
        var onTime = new GrainState<IdempotencyRecord>(Claimed(TimeSpan.FromMinutes(1)));
        await storage.WriteStateAsync(IdempotencyGrain.StateName, grainId, onTime);
        var lateUpdate = new GrainState<IdempotencyRecord>(Claimed(TimeSpan.FromSeconds(-1)), onTime.ETag);
        await Assert.ThrowsAsync<InconsistentStateException>(() => storage.WriteStateAsync(IdempotencyGrain.StateName, grainId, lateUpdate));

        // Any other record lands whenever it arrives: a completion is the outcome, however late.
        var completed = new GrainState<IdempotencyRecord>(
            onTime.State! with { Status = IdempotencyStatus.Completed, Response = Created, LeaseExpiresAt = now - TimeSpan.FromMinutes(5) }, onTime.ETag);
        await storage.WriteStateAsync(IdempotencyGrain.StateName, grainId, completed);
        AssertReplays(await silo.Grains.GetIdempotencyGrain(key).ClaimAsync(Claim()));
    }

    [Fact]
    public async Task ClaimThatWaitedOnALockPastItsLease_IsNotStored_ThoughItReachedTheStoreInTime()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await using var silo = await TestSilo.StartAsync(settings);
        var storage = silo.Host.Services.GetRequiredKeyedService<IGrainStorage>(IdempotencyGrain.StorageName);
        var grainId = ((GrainReference)silo.Grains.GetIdempotencyGrain(NewKey())).GrainId;

        // Maintenance holding the table (what VACUUM FULL or REINDEX would) from before the claim until after its lease.
        await using var maintenance = new NpgsqlConnection(settings["ConnectionStrings:Postgres"]);
        await maintenance.OpenAsync();
        await using var transaction = await maintenance.BeginTransactionAsync();
        await using (var take = new NpgsqlCommand("LOCK TABLE OrleansStorage IN SHARE MODE", maintenance, transaction))
        {
            await take.ExecuteNonQueryAsync();
        }

        // The lease runs from once the table is held: a slow machine must not spend it before the claim is sent.
        var now = DateTimeOffset.UtcNow;
        var claim = new GrainState<IdempotencyRecord>(new IdempotencyRecord
        {
            Status = IdempotencyStatus.InProgress, Fingerprint = Request, AttemptId = Guid.NewGuid(), FencingToken = 1,
            LeaseExpiresAt = now + TimeSpan.FromSeconds(3), CreatedAt = now, ExpiresAt = now + TimeSpan.FromHours(1), Retention = TimeSpan.FromHours(1),
        });
        var write = storage.WriteStateAsync(IdempotencyGrain.StateName, grainId, claim);

        // It reached the store in time (a late one is refused before it asks for the table) and waits on the lock ...
        for (var waited = 0; !await WaitsOnALockAsync(maintenance, transaction); waited += 50)
        {
            Assert.True(waited < 10_000 && !write.IsCompleted, "the write did not wait on the lock");
            await Task.Delay(50);
        }

        // ... until after its lease.
        if (now + TimeSpan.FromSeconds(3.5) - DateTimeOffset.UtcNow is { Ticks: > 0 } untilPastTheLease)
        {
            await Task.Delay(untilPastTheLease);
        }

        Assert.False(write.IsCompleted, "the write should have waited on the lock");
        await transaction.CommitAsync();

        await Assert.ThrowsAnyAsync<Exception>(() => write);
        var read = new GrainState<IdempotencyRecord>();
        await storage.ReadStateAsync(IdempotencyGrain.StateName, grainId, read);
        Assert.False(read.RecordExists);
    }

    [Fact]
    public async Task ReleaseByAnAttemptWhoseClaimNeverAnswered_RefusesThatClaimWhenItLandsLater()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await using var silo = await TestSilo.StartAsync(settings);
        var storage = silo.Host.Services.GetRequiredKeyedService<IGrainStorage>(IdempotencyGrain.StorageName);
        var key = NewKey();
        var grain = silo.Grains.GetIdempotencyGrain(key);
        var attempt = Guid.NewGuid();
        var now = DateTimeOffset.UtcNow;
        // The claim as the grain sent it (a create, its lease live), held up in the network while its caller gave up.
        var inFlight = new GrainState<IdempotencyRecord>(new IdempotencyRecord
        {
            Status = IdempotencyStatus.InProgress, Fingerprint = Request, AttemptId = attempt, FencingToken = 1,
            LeaseExpiresAt = now + TimeSpan.FromMinutes(1), CreatedAt = now, ExpiresAt = now + TimeSpan.FromHours(1), Retention = TimeSpan.FromHours(1),
        });

        Assert.False(await grain.ReleaseAsync(attempt, TimeSpan.FromMinutes(1)));

        await Assert.ThrowsAsync<InconsistentStateException>(() => storage.WriteStateAsync(IdempotencyGrain.StateName, ((GrainReference)grain).GrainId, inFlight));
        Assert.Equal(ClaimOutcome.Acquired, (await grain.ClaimAsync(Claim())).Outcome);
    }

    [Fact]
    public async Task Purge_DeletesOnlyExpiredRows_AndExpiresAtFollowsTheRecord()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await using var silo = await TestSilo.StartAsync(settings);
        var shortKeys = Enumerable.Range(0, 5).Select(_ => NewKey()).ToArray();
        var longKeys = Enumerable.Range(0, 5).Select(_ => NewKey()).ToArray();
        foreach (var key in shortKeys)
        {
            await CompleteAsync(silo.Grains.GetIdempotencyGrain(key), TimeSpan.FromHours(1));
        }

        foreach (var key in longKeys)
        {
            await CompleteAsync(silo.Grains.GetIdempotencyGrain(key), TimeSpan.FromHours(48));
        }

        var inProgress = NewKey();
        await silo.Grains.GetIdempotencyGrain(inProgress).ClaimAsync(Claim(TimeSpan.FromHours(1)));

        await using var database = new NpgsqlConnection(settings["ConnectionStrings:Postgres"]);
        await database.OpenAsync();
        var record = await silo.Grains.GetIdempotencyGrain(longKeys[0]).GetAsync();
        await using (var expiresAt = new NpgsqlCommand("SELECT ExpiresAt FROM OrleansStorage WHERE GrainIdExtensionString = @key", database))
        {
            expiresAt.Parameters.AddWithValue("key", longKeys[0].ToGrainKey());
            Assert.Equal(record.ExpiresAt.ToUnixTimeMilliseconds(), ((DateTimeOffset)(DateTime)(await expiresAt.ExecuteScalarAsync())!).ToUnixTimeMilliseconds());
        }

        var purger = silo.Host.Services.GetRequiredService<ExpiredRecordPurger>();
        var deleted = await purger.PurgeAsync(DateTimeOffset.UtcNow + TimeSpan.FromHours(2), CancellationToken.None);

        Assert.Equal(6, deleted);
        await using var count = new NpgsqlCommand("SELECT count(*) FROM OrleansStorage", database);
        Assert.Equal(5L, await count.ExecuteScalarAsync());
        foreach (var key in longKeys)
        {
            AssertReplays(await silo.Grains.GetIdempotencyGrain(key).ClaimAsync(Claim()));
        }
    }

    [Fact]
    public async Task PurgeBatchSlowerThanTheConnectionStringsCommandTimeout_StillDeletes()
    {
        // A command time-out set for the records' writes (1 s here) is no bound for a batch of deletes: one that always
        // ran out of it would roll back, round after round, and storage would grow without end.
        var connectionString = await servers.Postgres.CreateDatabaseAsync();
        await using var database = new IdempotencyDatabase(connectionString);
        await using var impatient = new IdempotencyDatabase(connectionString + ";Command Timeout=1");
        await new PostgresSchemaInstaller(database, TimeProvider.System, NullLogger<PostgresSchemaInstaller>.Instance).InstallAsync(CancellationToken.None);
        await ExecuteAsync(database, """
            INSERT INTO OrleansStorage (GrainIdHash, GrainTypeHash, ServiceId, GrainTypeString, GrainIdN0, GrainIdN1,
                                        GrainIdExtensionString, PayloadBinary, Version, ModifiedOn, ExpiresAt)
            SELECT n, 0, 'purge', 'idempotency', n, 0, '', NULL, 1, now(), now() - interval '1 day' FROM generate_series(1, 500) AS n;
            CREATE FUNCTION slow_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.005); RETURN OLD; END $$;
            CREATE TRIGGER slow_delete BEFORE DELETE ON OrleansStorage FOR EACH ROW EXECUTE FUNCTION slow_delete();
            """);
        var purger = new ExpiredRecordPurger(impatient, Options.Create(new IdempotencyStorageOptions()), TimeProvider.System, NullLogger<ExpiredRecordPurger>.Instance);

        Assert.Equal(500, await purger.PurgeAsync(DateTimeOffset.UtcNow, CancellationToken.None));
        Assert.Equal(0L, await ScalarAsync<long>(database, "SELECT count(*) FROM OrleansStorage"));
    }

    [Fact]
    public async Task ScheduledPurge_DeletesExpiredRowsInBatchesEachInterval_AndGoesOnAfterARoundFailed()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await using var silo = await TestSilo.StartAsync(settings);
        await using var database = new NpgsqlConnection(settings["ConnectionStrings:Postgres"]);
        await database.OpenAsync();
        var clock = new FakeTimeProvider(DateTimeOffset.UtcNow);
        var log = new FakeLogger<ExpiredRecordPurger>();
        using var purger = new ExpiredRecordPurger(silo.Host.Services.GetRequiredService<IdempotencyDatabase>(),
            Options.Create(new IdempotencyStorageOptions { PurgeInterval = TimeSpan.FromMinutes(1), PurgeBatchSize = 2 }), clock, log);
        await purger.StartAsync(CancellationToken.None);
        try
        {
            // Five rows, two to a batch: the first round deletes them all.
            await ExpiredRowsAsync(silo, database, 5);
            await UntilAsync(() => Task.FromResult(Purged(log).Count > 0), clock);
            Assert.Equal("5", Purged(log)[0]);
            Assert.Equal(0, await RowsAsync(database));

            // A round the database fails (the table gone for a moment) is logged; a later one purges.
            await ExpiredRowsAsync(silo, database, 3);
            await ExecuteAsync(database, "ALTER TABLE OrleansStorage RENAME TO OrleansStorageAway");
            await UntilAsync(() => Task.FromResult(log.Collector.GetSnapshot().Any(r => r.Level == LogLevel.Warning && r.Message.Contains("failed", StringComparison.Ordinal))), clock);
            await ExecuteAsync(database, "ALTER TABLE OrleansStorageAway RENAME TO OrleansStorage");
            Assert.Equal(3, await RowsAsync(database));
            await UntilAsync(async () => await RowsAsync(database) == 0, clock);
            // Whoever read the failure reads that it ended.
            await UntilAsync(() => Task.FromResult(log.Collector.GetSnapshot().Any(r => r.Level == LogLevel.Information
                && r.Message.Contains("succeeded again", StringComparison.Ordinal))), clock);
        }
        finally
        {
            await purger.StopAsync(CancellationToken.None);
        }
    }

    [Fact]
    public async Task ScheduledPurge_ThatFailsInAnyWay_IsLogged_AndGoesOn_RatherThanStopTheSilo()
    {
        var connectionString = await servers.Postgres.CreateDatabaseAsync();
        var database = new IdempotencyDatabase(connectionString);
        var clock = new FakeTimeProvider(DateTimeOffset.UtcNow);
        var log = new FakeLogger<ExpiredRecordPurger>();
        using var purger = new ExpiredRecordPurger(database, Options.Create(new IdempotencyStorageOptions { PurgeInterval = TimeSpan.FromMinutes(1) }), clock, log);
        await purger.StartAsync(CancellationToken.None);

        // Not an Npgsql failure: a data source gone (ObjectDisposedException). Round after round is logged.
        await database.DisposeAsync();
        await UntilAsync(() => Task.FromResult(log.Collector.GetSnapshot().Count(r => r.Level == LogLevel.Warning) >= 2), clock);

        Assert.False(purger.ExecuteTask!.IsCompleted);
        await purger.StopAsync(CancellationToken.None);
    }

    [Fact]
    public async Task ScheduledPurge_FailingForAnHour_LogsEachRoundAsAnError_ForStorageGrowsMeanwhile()
    {
        var database = new IdempotencyDatabase(await servers.Postgres.CreateDatabaseAsync());
        var clock = new FakeTimeProvider(DateTimeOffset.UtcNow);
        var log = new FakeLogger<ExpiredRecordPurger>();
        using var purger = new ExpiredRecordPurger(database, Options.Create(new IdempotencyStorageOptions { PurgeInterval = TimeSpan.FromMinutes(5) }), clock, log);
        await purger.StartAsync(CancellationToken.None);
        await database.DisposeAsync();

        // The first round comes once the service has started its timer, whenever that is; the rest 5 minutes apart,
        // each waited for, so that none is skipped: the thirteenth is the first an hour after the first.
        await UntilAsync(() => Task.FromResult(log.Collector.Count > 0), clock);
        for (var round = 2; round <= 14; round++)
        {
            clock.Advance(TimeSpan.FromMinutes(5));
            for (var waited = 0; log.Collector.GetSnapshot().Count(r => r.Level >= LogLevel.Warning) < round; waited += 20)
            {
                Assert.True(waited < 10_000, $"Round {round} was not logged.");
                await Task.Delay(20);
            }
        }

        await purger.StopAsync(CancellationToken.None);
        var levels = log.Collector.GetSnapshot().Where(r => r.Level >= LogLevel.Warning).Select(r => r.Level).ToList();
        Assert.Equal([.. Enumerable.Repeat(LogLevel.Warning, 12), LogLevel.Error, LogLevel.Error], levels.Take(14));
        Assert.Equal("13", log.Collector.GetSnapshot().First(r => r.Level == LogLevel.Error).GetStructuredStateValue("Rounds"));
    }

    // Completes count keys, then moves every row's expiry an hour back: past the purge's grace by PostgreSQL's clock.
    private static async Task ExpiredRowsAsync(TestSilo silo, NpgsqlConnection database, int count)
    {
        for (var i = 0; i < count; i++)
        {
            await CompleteAsync(silo.Grains.GetIdempotencyGrain(NewKey()), TimeSpan.FromHours(1));
        }

        await ExecuteAsync(database, "UPDATE OrleansStorage SET ExpiresAt = now() - interval '1 hour'");
    }

    private static async Task<long> RowsAsync(NpgsqlConnection database)
    {
        await using var command = new NpgsqlCommand("SELECT count(*) FROM OrleansStorage", database);
        return (long)(await command.ExecuteScalarAsync())!;
    }

    private static async Task ExecuteAsync(NpgsqlConnection database, string sql)
    {
        await using var command = new NpgsqlCommand(sql, database);
        await command.ExecuteNonQueryAsync();
    }

    // Polls the condition for at most 10 seconds, moving the purge's clock 5 s on at each poll: a background service's
    // loop starts on its own (.NET 10), so its timer may not exist yet when the test first moves the clock.
    private static async Task UntilAsync(Func<Task<bool>> condition, FakeTimeProvider clock)
    {
        for (var waited = 0; !await condition(); waited += 50)
        {
            Assert.True(waited < 10_000, "The condition never held.");
            clock.Advance(TimeSpan.FromSeconds(5));
            await Task.Delay(50);
        }
    }

    // The counts each purge round logged, in order.
    private static List<string> Purged(FakeLogger<ExpiredRecordPurger> log) =>
        [.. log.Collector.GetSnapshot().Where(r => r.Message.StartsWith("Purged ", StringComparison.Ordinal)).Select(r => r.GetStructuredStateValue("Count")!)];

    [Fact]
    public async Task SiloClockApartFromPostgres_IsWarnedOfAtStart_AndThePurgeGoesByPostgresClock()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await using var silo = await TestSilo.StartAsync(settings);
        var key = NewKey();
        await CompleteAsync(silo.Grains.GetIdempotencyGrain(key), TimeSpan.FromHours(1));
        var database = silo.Host.Services.GetRequiredService<IdempotencyDatabase>();
        // A silo whose clock runs two hours ahead: by its clock the record above expired an hour ago.
        var ahead = new FakeTimeProvider(DateTimeOffset.UtcNow + TimeSpan.FromHours(2));
        var installerLog = new FakeLogger<PostgresSchemaInstaller>();
        var purgerLog = new FakeLogger<ExpiredRecordPurger>();
        var onTime = new FakeLogger<PostgresSchemaInstaller>();

        await new PostgresSchemaInstaller(database, ahead, installerLog).InstallAsync(CancellationToken.None);
        await new PostgresSchemaInstaller(database, TimeProvider.System, onTime).InstallAsync(CancellationToken.None);
        await new ExpiredRecordPurger(database, Options.Create(new IdempotencyStorageOptions()), ahead, purgerLog).PurgeExpiredAsync(CancellationToken.None);

        Assert.Contains(installerLog.Collector.GetSnapshot(), r => r.Level == LogLevel.Warning
            && double.Parse(r.GetStructuredStateValue("OffsetSeconds")!, System.Globalization.CultureInfo.InvariantCulture) is > -7260 and < -7140);
        Assert.Contains(purgerLog.Collector.GetSnapshot(), r => r.Level == LogLevel.Warning && r.Message.Contains("NTP", StringComparison.Ordinal));
        // (The tests' server runs with fsync off, which the start warns of apart.)
        Assert.DoesNotContain(onTime.Collector.GetSnapshot(), r => r.Level >= LogLevel.Warning && r.Message.Contains("NTP", StringComparison.Ordinal));
        await silo.Grains.GetGrain<IManagementGrain>(0).ForceActivationCollection(TimeSpan.Zero);
        AssertReplays(await silo.Grains.GetIdempotencyGrain(key).ClaimAsync(Claim()));
    }

    [Fact]
    public async Task SiloClockBehindPostgres_StillReplaysItsKey_UntilItsRetentionEndsByThatClock()
    {
        // The purge goes by PostgreSQL's clock: a silo 30 s behind it writes expiries that PostgreSQL reads as 30 s
        // early. This record is past its expiry by PostgreSQL's clock as it is written, 20 s before it by the silo's.
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await using var silo = await TestSilo.StartAsync(settings, s => s.Services.AddSingleton<TimeProvider>(new OffsetClock(TimeSpan.FromSeconds(-30))));
        var key = NewKey();
        await CompleteAsync(silo.Grains.GetIdempotencyGrain(key), TimeSpan.FromSeconds(20));
        var purger = silo.Host.Services.GetRequiredService<ExpiredRecordPurger>();

        await purger.PurgeExpiredAsync(CancellationToken.None);
        await silo.Grains.GetGrain<IManagementGrain>(0).ForceActivationCollection(TimeSpan.Zero);

        AssertReplays(await silo.Grains.GetIdempotencyGrain(key).ClaimAsync(Claim()));
    }

    [Fact]
    public async Task ScopeWithANul_IsStoredInPostgres_AndReplays()
    {
        // A JSON claim may hold "\u0000", which PostgreSQL's text cannot: every write of such a scope failed, as 503.
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await using var silo = await TestSilo.StartAsync(settings);
        var key = new IdempotencyKey("tenant\0a", Guid.NewGuid().ToString("N"));

        await CompleteAsync(silo.Grains.GetIdempotencyGrain(key), TimeSpan.FromHours(1));
        await silo.Grains.GetGrain<IManagementGrain>(0).ForceActivationCollection(TimeSpan.Zero);

        AssertReplays(await silo.Grains.GetIdempotencyGrain(key).ClaimAsync(Claim()));
        Assert.Equal(ClaimOutcome.Acquired, (await silo.Grains.GetIdempotencyGrain(key with { Scope = "tenant\0b" }).ClaimAsync(Claim())).Outcome);
    }

    [Fact]
    public async Task StoreOutage_FailsClosed_ThenServiceResumesByItself()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await using var silo = await TestSilo.StartAsync(settings);
        await CompleteAsync(silo.Grains.GetIdempotencyGrain(NewKey()), TimeSpan.FromHours(1));
        var key = NewKey();
        var request = Claim();

        await servers.Postgres.StopAsync();
        try
        {
            await Assert.ThrowsAnyAsync<Exception>(() => silo.Grains.GetIdempotencyGrain(key).ClaimAsync(request));
        }
        finally
        {
            await servers.Postgres.StartAgainAsync();
        }

        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        ClaimResult? claim = null;
        while (claim is null)
        {
            try
            {
                claim = await silo.Grains.GetIdempotencyGrain(key).ClaimAsync(request);
            }
            catch (Exception) when (DateTime.UtcNow < deadline)
            {
                // Pooled connections to the old server fail once each; the grain re-reads after a failed write.
                await Task.Delay(200);
            }
        }

        Assert.Equal(ClaimOutcome.Acquired, claim.Outcome);
        Assert.Equal(1, claim.Token!.Value.FencingToken);
    }

    /// <summary>The row's version: how many writes landed.</summary>
    private static async Task<int> VersionAsync(Dictionary<string, string?> settings, IdempotencyKey key)
    {
        await using var connection = new NpgsqlConnection(settings["ConnectionStrings:Postgres"]);
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand("SELECT Version FROM OrleansStorage WHERE GrainIdExtensionString = @key", connection);
        command.Parameters.AddWithValue("key", key.ToGrainKey());
        return (int)(await command.ExecuteScalarAsync())!;
    }

    private static async Task CompleteAsync(IIdempotencyGrain grain, TimeSpan retention)
    {
        var claim = await grain.ClaimAsync(Claim(retention));
        Assert.True(await grain.CompleteAsync(claim.Token!.Value, Created));
    }

    private static void AssertReplays(ClaimResult result)
    {
        Assert.Equal(ClaimOutcome.Completed, result.Outcome);
        Assert.Equal(Created.Body, result.Response!.Body);
        Assert.Equal(Created.Headers, result.Response.Headers);
        Assert.Equal(Created.StatusCode, result.Response.StatusCode);
    }

    /// <summary>Two clusters (through Redis) on one database: each hosts its own activation of every key.</summary>
    private sealed class TwoClusters(Dictionary<string, string?> settings, TestSilo first, TestSilo second) : IAsyncDisposable
    {
        public Dictionary<string, string?> Settings { get; } = settings;

        public TestSilo First { get; } = first;

        public TestSilo Second { get; } = second;

        public static async Task<TwoClusters> StartAsync(ServersFixture servers)
        {
            var settings = await TestClusterSettings.CreateAsync(servers, redis: true);
            var first = await TestSilo.StartAsync(settings);
            try
            {
                return new TwoClusters(settings, first,
                    await TestSilo.StartAsync(new Dictionary<string, string?>(settings) { ["Orleans:ClusterId"] = settings["Orleans:ClusterId"] + "-b" }));
            }
            catch
            {
                await first.DisposeAsync();
                throw;
            }
        }

        public async ValueTask DisposeAsync()
        {
            await Second.DisposeAsync();
            await First.DisposeAsync();
        }
    }

    private sealed class OffsetClock(TimeSpan offset) : TimeProvider
    {
        public override DateTimeOffset GetUtcNow() => base.GetUtcNow() + offset;
    }
}
