using System.Globalization;
using Microsoft.Extensions.Configuration;

namespace OrleansIdempotency.Silo.Hosting;

/// <summary>Whether a process hosts a silo or joins an existing cluster as a client.</summary>
public enum IdempotencyClusterRole
{
    /// <summary>Hosts a silo (the default).</summary>
    Silo,

    /// <summary>Connects to silos started elsewhere.</summary>
    Client,
}

/// <summary>
/// How a process finds its cluster and storage, read from configuration (DESIGN §7). Without connection strings a
/// silo runs the embedded default: localhost clustering and in-memory storage.
/// </summary>
/// <param name="Postgres"><c>ConnectionStrings:Postgres</c>: Npgsql connection string for the records.</param>
/// <param name="Redis"><c>ConnectionStrings:Redis</c>: StackExchange.Redis configuration for cluster membership.</param>
/// <param name="Role"><c>Orleans:Role</c>: <c>Silo</c> (default) or <c>Client</c>.</param>
/// <param name="ClusterId"><c>Orleans:ClusterId</c>: silos with the same id (and Redis) form one cluster.</param>
/// <param name="ServiceId"><c>Orleans:ServiceId</c>: names the stored records; keep it across deployments.</param>
/// <param name="SiloPort"><c>Orleans:Endpoints:SiloPort</c>: silo-to-silo port. The default is 11111.</param>
/// <param name="GatewayPort"><c>Orleans:Endpoints:GatewayPort</c>: client gateway port. The default is 30000.</param>
/// <param name="AdvertisedHost">
/// <c>Orleans:Endpoints:AdvertisedHost</c>: the host name or address other silos reach this one at; null when unset,
/// and then <see cref="DefaultAdvertisedHost"/>. In containers, the container's host name.
/// </param>
public sealed record IdempotencyClusterSettings(
    string? Postgres,
    string? Redis,
    IdempotencyClusterRole Role,
    string ClusterId,
    string ServiceId,
    int SiloPort,
    int GatewayPort,
    string? AdvertisedHost)
{
    /// <summary>The address a silo advertises when <c>Orleans:Endpoints:AdvertisedHost</c> is not set.</summary>
    public const string DefaultAdvertisedHost = "127.0.0.1";

    /// <summary>The cluster and service id used when none is configured.</summary>
    public const string DefaultId = "orleans-idempotency";

    /// <summary>Reads the settings, with their defaults.</summary>
    public static IdempotencyClusterSettings From(IConfiguration configuration)
    {
        var orleans = configuration.GetSection("Orleans");
        var endpoints = orleans.GetSection("Endpoints");
        return new(
            Postgres: NullIfEmpty(configuration.GetConnectionString("Postgres")),
            Redis: NullIfEmpty(configuration.GetConnectionString("Redis")),
            Role: ReadRole(orleans["Role"]),
            ClusterId: NullIfEmpty(orleans["ClusterId"]) ?? DefaultId,
            ServiceId: NullIfEmpty(orleans["ServiceId"]) ?? DefaultId,
            SiloPort: ReadPort(endpoints["SiloPort"], 11111, "SiloPort"),
            GatewayPort: ReadPort(endpoints["GatewayPort"], 30000, "GatewayPort"),
            AdvertisedHost: NullIfEmpty(endpoints["AdvertisedHost"]));
    }

    private static string? NullIfEmpty(string? value) => string.IsNullOrWhiteSpace(value) ? null : value;

    // A role's name in any case; not a number, which Enum.Parse would take whether the enum defines it or not.
    private static IdempotencyClusterRole ReadRole(string? value) =>
        string.IsNullOrWhiteSpace(value) ? IdempotencyClusterRole.Silo
        : Enum.GetNames<IdempotencyClusterRole>().FirstOrDefault(name => name.Equals(value.Trim(), StringComparison.OrdinalIgnoreCase)) is { } role
            ? Enum.Parse<IdempotencyClusterRole>(role)
        : throw new InvalidOperationException($"Orleans:Role is '{value}': expected Silo or Client.");

    private static int ReadPort(string? value, int defaultPort, string setting) =>
        string.IsNullOrWhiteSpace(value) ? defaultPort
        : int.TryParse(value.Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out var port) && port is > 0 and <= 65535 ? port
        : throw new InvalidOperationException($"Orleans:Endpoints:{setting} is '{value}': expected a port number, 1 to 65535.");
}
