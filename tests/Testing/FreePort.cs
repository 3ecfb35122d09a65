using System.Net;
using System.Net.Sockets;

namespace OrleansIdempotency.Testing;

/// <summary>Loopback ports nobody is listening on.</summary>
public static class FreePort
{
    /// <summary>A port the OS just handed out and released; another process could take it, so callers retry on a clash.</summary>
    public static int Next()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    /// <summary>Configuration that puts a silo's silo and gateway endpoints on free ports.</summary>
    public static Dictionary<string, string?> SiloEndpoints() => new()
    {
        ["Orleans:Endpoints:SiloPort"] = Next().ToString(System.Globalization.CultureInfo.InvariantCulture),
        ["Orleans:Endpoints:GatewayPort"] = Next().ToString(System.Globalization.CultureInfo.InvariantCulture),
    };
}
